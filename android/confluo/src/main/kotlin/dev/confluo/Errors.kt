// The SDK's one public error type, and the single place where the
// generated bindings' errors become it (apps never import dev.confluo.ffi).
package dev.confluo

import dev.confluo.ffi.ConfluoException as FfiException

/** Everything Confluo throws. Branch on the subclass; [message] says what went wrong. */
sealed class ConfluoException(message: String, cause: Throwable? = null) : Exception(message, cause) {
    /** The input was refused (bad SQL parameters, a value that cannot be bound, a misspelled column...). Nothing was changed. */
    class InvalidInput(message: String, cause: Throwable? = null) : ConfluoException(message, cause)

    /** A table cannot be synced as it is, or a migration was refused. */
    class Schema(message: String, cause: Throwable? = null) : ConfluoException(message, cause)

    /** SQLite failed (the message is SQLite's own), or storage is broken. */
    class Storage(message: String, cause: Throwable? = null) : ConfluoException(message, cause)

    /** The sync server was unreachable or failed; [retryable] failures go away by trying again later. */
    class Network(message: String, val retryable: Boolean, cause: Throwable? = null) : ConfluoException(message, cause)

    /** The server refused the token (a refreshed one too), or the token provider failed: sign in again. */
    class Auth(message: String, cause: Throwable? = null) : ConfluoException(message, cause)

    /** The database was closed. */
    class Closed(cause: Throwable? = null) : ConfluoException("the database is closed", cause)

    /** The engine stopped the call because it was cancelled (coroutine cancellation surfaces as CancellationException). */
    class Cancelled(cause: Throwable? = null) : ConfluoException("cancelled", cause)
}

/** The kind of failure a [SyncState.Error] reports: the [ConfluoException] subclass it would be. */
enum class ErrorKind { INVALID_INPUT, SCHEMA, STORAGE, NETWORK, AUTH, CLOSED, CANCELLED }

internal fun FfiException.toPublic(): ConfluoException = when (this) {
    is FfiException.InvalidInput -> ConfluoException.InvalidInput(detail, this)
    is FfiException.Schema -> ConfluoException.Schema(detail, this)
    is FfiException.Storage -> ConfluoException.Storage(detail, this)
    is FfiException.Network -> ConfluoException.Network(detail, retryable, this)
    is FfiException.Auth -> ConfluoException.Auth(detail, this)
    is FfiException.Closed -> ConfluoException.Closed(this)
    is FfiException.Cancelled -> ConfluoException.Cancelled(this)
}

internal fun dev.confluo.ffi.ErrorKind.toPublic(): ErrorKind = when (this) {
    dev.confluo.ffi.ErrorKind.INVALID_INPUT -> ErrorKind.INVALID_INPUT
    dev.confluo.ffi.ErrorKind.SCHEMA -> ErrorKind.SCHEMA
    dev.confluo.ffi.ErrorKind.STORAGE -> ErrorKind.STORAGE
    dev.confluo.ffi.ErrorKind.NETWORK -> ErrorKind.NETWORK
    dev.confluo.ffi.ErrorKind.AUTH -> ErrorKind.AUTH
    dev.confluo.ffi.ErrorKind.CLOSED -> ErrorKind.CLOSED
    dev.confluo.ffi.ErrorKind.CANCELLED -> ErrorKind.CANCELLED
}

/** Runs a call into the generated bindings, rethrowing their errors as [ConfluoException]. */
internal inline fun <T> ffiCall(block: () -> T): T = try {
    block()
} catch (e: FfiException) {
    throw e.toPublic()
}
