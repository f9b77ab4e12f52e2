package dev.confluo.todo

import android.app.NotificationChannel
import android.app.NotificationManager
import android.content.Context
import android.os.Build
import androidx.core.app.NotificationCompat
import androidx.work.ForegroundInfo
import androidx.work.Constraints
import androidx.work.CoroutineWorker
import androidx.work.ExistingPeriodicWorkPolicy
import androidx.work.ExistingWorkPolicy
import androidx.work.NetworkType
import androidx.work.OneTimeWorkRequestBuilder
import androidx.work.OutOfQuotaPolicy
import androidx.work.PeriodicWorkRequestBuilder
import androidx.work.WorkManager
import androidx.work.WorkerParameters
import dev.confluo.todo.core.SyncOutcome
import kotlinx.coroutines.flow.first
import java.util.concurrent.TimeUnit

/** One sync with the server, when the app is not in the foreground. */
class SyncWorker(context: Context, params: WorkerParameters) : CoroutineWorker(context, params) {
    /** Expedited work runs as a foreground service before Android 12, which needs a notification. */
    override suspend fun getForegroundInfo(): ForegroundInfo {
        val manager = applicationContext.getSystemService(NotificationManager::class.java)
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.O) {
            manager.createNotificationChannel(NotificationChannel(CHANNEL, "Sync", NotificationManager.IMPORTANCE_MIN))
        }
        val notification = NotificationCompat.Builder(applicationContext, CHANNEL)
            .setSmallIcon(android.R.drawable.stat_notify_sync)
            .setContentTitle("Syncing your list")
            .setPriority(NotificationCompat.PRIORITY_MIN)
            .build()
        return ForegroundInfo(NOTIFICATION_ID, notification)
    }

    private companion object {
        const val CHANNEL = "sync"
        const val NOTIFICATION_ID = 1
    }

    override suspend fun doWork(): Result {
        val app = applicationContext as TodoApp
        return when (app.repository.await().syncOnce(app.settings.first())) {
            SyncOutcome.SYNCED, SyncOutcome.NOT_CONFIGURED -> Result.success()
            SyncOutcome.RETRY_LATER -> Result.retry()
            // A refused token stays refused: retrying would only hammer the
            // server. The status chip asks the user to sign in again.
            SyncOutcome.SIGN_IN_REQUIRED, SyncOutcome.FAILED -> Result.failure()
        }
    }
}

object SyncWork {
    private val online = Constraints.Builder().setRequiredNetworkType(NetworkType.CONNECTED).build()

    /** Every 15 minutes (WorkManager's minimum), while the app is in the background. */
    fun schedulePeriodic(context: Context) {
        val request = PeriodicWorkRequestBuilder<SyncWorker>(15, TimeUnit.MINUTES).setConstraints(online).build()
        WorkManager.getInstance(context).enqueueUniquePeriodicWork("sync", ExistingPeriodicWorkPolicy.KEEP, request)
    }

    /** Soon after a local change, so it leaves the device even if the app is closed. */
    fun scheduleExpedited(context: Context) {
        val request = OneTimeWorkRequestBuilder<SyncWorker>()
            .setConstraints(online)
            .setExpedited(OutOfQuotaPolicy.RUN_AS_NON_EXPEDITED_WORK_REQUEST)
            .build()
        // APPEND_OR_REPLACE, not REPLACE (which cancels a sync in flight)
        // nor KEEP (which drops this request while a sync runs, and that
        // sync may have read its changes before this edit): the new sync
        // runs after the one in flight, so every edit is sent; after a
        // failed or cancelled sync it starts a fresh chain.
        WorkManager.getInstance(context).enqueueUniqueWork("sync-now", ExistingWorkPolicy.APPEND_OR_REPLACE, request)
    }
}
