import Foundation
import ConfluoFFI

/// The SDK's error: invalid input, schema, storage (with SQLite's message),
/// network (retryable or not), auth, closed, or cancelled.
public typealias ConfluoError = ConfluoFFI.ConfluoError

/// One SQLite value (null, integer, real, text or blob), as a rejected
/// change's key holds them.
public typealias SqlValue = ConfluoFFI.SqlValue

/// A Confluo database: an ordinary SQLite database whose synced tables
/// converge across devices.
///
/// Every method that touches the database is `async`, honours Task
/// cancellation (checked before it starts), and runs on the database's own
/// queues: one serial queue for writes and a small pool for reads, so a
/// burst of calls never takes a thread each.
public final class Confluo: @unchecked Sendable {
    private let db: Database
    private let writes = Confluo.queue("writes", width: 1)
    private let reads = Confluo.queue("reads", width: 2)
    /// syncNow, kept off the write queue: a slow server must not hold up writes.
    private let syncs = Confluo.queue("sync-now", width: 1)
    /// Starting, stopping and signing out, in call order (setOnline too, so a
    /// hint given before startSync reaches the engine before it starts).
    private let lifecycle = Confluo.queue("lifecycle", width: 1)

    private let lock = NSLock()
    private var closed = false
    private var sync: BackgroundSync?
    /// Bumped whenever a sync stops or starts: statuses from an older sync
    /// are dropped, so none arrives after stopSync returns.
    private var generation = 0
    private var statusContinuations: [UUID: AsyncStream<SyncStatus>.Continuation] = [:]
    private var lastStatus: SyncStatus
    /// Watch streams, finished when the database closes.
    private var watchers: [UUID: () -> Void] = [:]
    private var pendingObserver: Observer?
    private var refreshingStoppedStatus = false

    private init(_ db: Database) throws {
        self.db = db
        lastStatus = SyncStatus(try db.stoppedStatus())
        // While no sync runs, the stopped status follows local commits.
        pendingObserver = db.observe(tables: [], listener: ChangeRelay { [weak self] _ in
            self?.refreshStoppedStatus()
        })
    }

    private static func queue(_ name: String, width: Int) -> OperationQueue {
        let queue = OperationQueue()
        queue.name = "dev.confluo.\(name)"
        queue.maxConcurrentOperationCount = width
        queue.qualityOfService = .userInitiated
        return queue
    }

    /// Opens (creating if needed) the database file at `path`.
    public static func open(path: String) async throws -> Confluo {
        try await opening { try Confluo(try Database.open(path: path)) }
    }

    /// Opens a private in-memory database (for tests and previews).
    public static func openInMemory() async throws -> Confluo {
        try await opening { try Confluo(try Database.openInMemory()) }
    }

    private static func opening(_ open: @escaping @Sendable () throws -> Confluo) async throws -> Confluo {
        try Task.checkCancellation()
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global(qos: .userInitiated).async { continuation.resume(with: Result { try open() }) }
        }
    }

    /// This database's site id (a UUID), created once and kept in the file.
    public var siteId: String {
        get async throws { try await run(reads) { self.db.siteId() } }
    }

    /// Runs one statement in its own transaction; returns the rows changed.
    @discardableResult
    public func execute(_ sql: String, _ args: Any?...) async throws -> Int {
        let params = try sqlValues(args)
        return try await run(writes) { Int(try self.db.execute(sql: sql, params: params)) }
    }

    /// Runs several statements (a migration, say) in one transaction.
    public func executeBatch(_ sql: String) async throws {
        try await run(writes) { try self.db.executeBatch(sql: sql) }
    }

    /// Runs a query; read-only queries never wait behind a write.
    public func query(_ sql: String, _ args: Any?...) async throws -> [Row] {
        let params = try sqlValues(args)
        return try await run(reads) { rows(try self.db.query(sql: sql, params: params)) }
    }

    /// Runs a query and maps each row to `type` (properties by column name).
    public func query<T: Decodable>(_ sql: String, _ args: Any?..., as type: T.Type) async throws -> [T] {
        let params = try sqlValues(args)
        return try await run(reads) { try rows(try self.db.query(sql: sql, params: params)).map { try $0.decode(type) } }
    }

    /// Runs `body` in one write transaction: committed when it returns,
    /// rolled back when it throws (the error is rethrown). `body` runs on the
    /// database's write queue and must not keep the `WriteScope`.
    public func write<T>(_ body: @escaping (WriteScope) throws -> T) async throws -> T {
        try await run(writes) {
            let runner = WriteRunner(body)
            do {
                try self.db.write(body: runner)
            } catch {
                // The body's own error beats the rollback's report of it.
                if let own = runner.failure { throw own }
                throw error
            }
            return runner.result!
        }
    }

    /// Makes `table` a synced table.
    public func enableSync(_ table: String) async throws {
        try await run(writes) { try self.db.enableSync(table: table) }
    }

    /// Runs a schema migration of a synced table and re-installs its tracking.
    public func alterSyncedTable(_ table: String, _ sql: String) async throws {
        try await run(writes) { try self.db.alterSyncedTable(table: table, sql: sql) }
    }

    /// Makes `table` synced and brings it to the end of its history: `create`
    /// is the statement that first made it, `migrations` every later change
    /// of it in order (the same lists on every install). Whether the table is
    /// missing, older, or made directly in its latest shape by a new install,
    /// it ends with the columns (and column identities) the whole history
    /// gives; only the migrations it lacks run, so call it at every start.
    public func enableSyncWithHistory(_ table: String, create: String, migrations: [String]) async throws {
        try await run(writes) {
            try self.db.enableSyncWithHistory(table: table, create: create, migrations: migrations)
        }
    }

    /// Rows with local changes the sync server has not accepted yet.
    public func pendingChanges() async throws -> Int {
        try await run(reads) { Int(try self.db.pendingChanges()) }
    }

    /// The changes from the server kept aside because this database could
    /// not apply them.
    public func rejectedChanges() async throws -> [RejectedChange] {
        try await run(reads) { try self.db.rejectedChanges().map(RejectedChange.init) }
    }

    /// How many changes are kept aside (see `rejectedChanges()`).
    public func rejectedCount() async throws -> Int {
        try await run(reads) { Int(try self.db.rejectedCount()) }
    }

    /// The space this database syncs with, once it has tried to.
    public func boundSpace() async throws -> String? {
        try await run(reads) { try self.db.boundSpace() }
    }

    /// The result of `sql` now, and again after every commit (local or synced)
    /// that changes any of `tables` (every table when empty). Finishes when
    /// the database closes; ending the iteration stops the watching.
    public func watch(_ sql: String, _ args: Any?..., tables: [String] = []) -> AsyncThrowingStream<[Row], Error> {
        watching(sql, args, tables: tables) { $0 }
    }

    /// `watch`, with each row mapped to `type`.
    public func watch<T: Decodable>(_ sql: String, _ args: Any?..., tables: [String] = [],
                                    as type: T.Type) -> AsyncThrowingStream<[T], Error> {
        watching(sql, args, tables: tables) { try $0.map { try $0.decode(type) } }
    }

    private func watching<T>(_ sql: String, _ args: [Any?], tables: [String],
                             _ map: @escaping ([Row]) throws -> T) -> AsyncThrowingStream<T, Error> {
        let params: [SqlValue]
        do {
            params = try sqlValues(args)
        } catch {
            return AsyncThrowingStream { $0.finish(throwing: error) }
        }
        return AsyncThrowingStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            let id = UUID()
            lock.lock()
            if closed {
                lock.unlock()
                continuation.finish(throwing: ConfluoError.Closed)
                return
            }
            watchers[id] = { continuation.finish() }
            lock.unlock()
            let db = self.db
            let rerun = Rerun(queue: reads) {
                do {
                    continuation.yield(try map(rows(try db.query(sql: sql, params: params))))
                } catch ConfluoError.Closed {
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            let watched = Set(tables)
            let observer = db.observe(tables: tables, listener: ChangeRelay { changed in
                // Only the watched tables' commits re-run the query.
                if watched.isEmpty || !watched.isDisjoint(with: changed) { rerun.request() }
            })
            rerun.request()
            continuation.onTermination = { [weak self] _ in
                observer.cancel()
                guard let self else { return }
                self.lock.lock()
                self.watchers[id] = nil
                self.lock.unlock()
            }
        }
    }

    /// Syncs once with the server: pushes, then pulls until caught up.
    /// Cancelling the Task stops it before its next request and throws
    /// `CancellationError`.
    public func syncNow(_ options: SyncOptions, token: @escaping TokenProvider) async throws -> SyncReport {
        let config = try options.ffi()
        let cancellation = SyncCancellation()
        do {
            return try await withTaskCancellationHandler {
                try await run(syncs) {
                    SyncReport(try self.db.syncNow(config: config, token: TokenRelay(token), cancellation: cancellation))
                }
            } onCancel: {
                cancellation.cancel()
            }
        } catch {
            // A request in flight when the Task was cancelled may end in its
            // own error (a timeout, say): to the caller it was cancelled.
            if case ConfluoError.Cancelled = error { throw CancellationError() }
            if Task.isCancelled { throw CancellationError() }
            throw error
        }
    }

    /// Background sync's status, as a stream: the current status first, then
    /// every change. Before any sync runs, the current status is `.stopped`
    /// with the real count of unsent rows. Finishes when the database closes.
    public var syncStatus: AsyncStream<SyncStatus> {
        AsyncStream { continuation in
            let id = UUID()
            lock.lock()
            if closed {
                lock.unlock()
                continuation.finish()
                return
            }
            statusContinuations[id] = continuation
            continuation.yield(lastStatus)
            lock.unlock()
            continuation.onTermination = { [weak self] _ in
                guard let self else { return }
                self.lock.lock()
                self.statusContinuations[id] = nil
                self.lock.unlock()
            }
        }
    }

    /// Starts background sync (replacing one already running): a sync shortly
    /// after local commits, a long poll for others' changes, retries with
    /// backoff. Its status flows into `syncStatus`. `token` is asked again
    /// with `invalidate: true` when the server refuses a token.
    public func startSync(_ options: SyncOptions, token: @escaping TokenProvider) async throws {
        let config = try options.ffi()
        try await run(lifecycle) {
            self.lock.lock()
            self.generation += 1
            let current = self.generation
            self.lock.unlock()
            let relay = StatusRelay { [weak self] status in self?.publish(SyncStatus(status), from: current) }
            // The engine stops the previous sync of this database first.
            let started = try self.db.startSync(config: config, token: TokenRelay(token), listener: relay)
            self.lock.lock()
            let previous = self.sync
            self.sync = started
            self.lock.unlock()
            _ = previous
        }
    }

    /// The platform's network hint (e.g. from NWPathMonitor). Remembered while
    /// no sync runs: a sync started later starts offline after `false`.
    public func setOnline(_ online: Bool) {
        lifecycle.addOperation { self.db.setOnline(online: online) }
    }

    /// Syncs now, skipping any backoff; after `.authRequired`, asks the token
    /// provider again.
    public func syncSoon() {
        lock.lock()
        let running = sync
        lock.unlock()
        running?.syncSoon()
    }

    /// Stops background sync (within about a second, off the caller's
    /// thread). The status becomes `.stopped`; none arrives after this returns.
    public func stopSync() async {
        try? await run(lifecycle, checkingCancellation: false) {
            let running = self.endSync()
            running?.stop()
            self.publishStoppedStatus()
        }
    }

    /// Signs out: stops background sync and forgets its token provider, then,
    /// in one transaction, forgets the space, cursor and push marks and
    /// deletes every synced row (the deletes are not synced). Local tables
    /// stay. Afterwards `startSync` may use another space.
    public func signOutAndClear() async throws {
        try await run(lifecycle) {
            let running = self.endSync()
            // The engine stops the sync itself, under the lock startSync takes.
            try self.db.signOutAndClear()
            _ = running
            self.publishStoppedStatus()
        }
    }

    /// Detaches the running sync: its statuses are dropped from now on.
    private func endSync() -> BackgroundSync? {
        lock.lock()
        defer { lock.unlock() }
        generation += 1
        let running = sync
        sync = nil
        return running
    }

    /// Everything recorded after `since`, encoded (peer-to-peer sync).
    public func changesSince(_ since: UInt64) async throws -> Data {
        try await run(reads) { try self.db.changesSince(since: since) }
    }

    /// What peer `peerSiteId` misses, given what it has seen from us.
    public func changesForPeer(_ peerSiteId: String, seenByPeer: UInt64) async throws -> Data {
        try await run(reads) { try self.db.changesForPeer(peerSiteId: peerSiteId, seenByPeer: seenByPeer) }
    }

    /// How much of `peerSiteId`'s history this database has received.
    public func seenVersion(_ peerSiteId: String) async throws -> UInt64 {
        try await run(reads) { try self.db.seenVersion(peerSiteId: peerSiteId) }
    }

    /// Merges an encoded change set; returns how many changes won.
    @discardableResult
    public func applyChanges(_ changeset: Data) async throws -> Int {
        try await run(writes) { Int(try self.db.applyChanges(changeset: changeset).applied) }
    }

    /// Closes the database; the file can be opened again, and every later
    /// call throws `ConfluoError.Closed`. Returns at once: a sync in flight
    /// is abandoned, not waited for. Status and watch streams finish.
    public func close() throws {
        lock.lock()
        closed = true
        generation += 1
        let continuations = Array(statusContinuations.values)
        let finishWatchers = Array(watchers.values)
        statusContinuations = [:]
        watchers = [:]
        let observer = pendingObserver
        pendingObserver = nil
        lock.unlock()
        observer?.cancel()
        // The engine halts the sync without waiting, and serializes this with
        // startSync: a sync cannot start on a closed database.
        try db.closeDatabase()
        // Released only now: releasing a running sync would wait for it.
        lock.lock()
        let running = sync
        sync = nil
        lock.unlock()
        _ = running
        continuations.forEach { $0.finish() }
        finishWatchers.forEach { $0() }
    }

    private func publish(_ status: SyncStatus, from syncGeneration: Int) {
        lock.lock()
        guard syncGeneration == generation, !closed else {
            lock.unlock()
            return
        }
        lastStatus = status
        // Yielded under the lock, so two threads cannot reorder statuses.
        statusContinuations.values.forEach { $0.yield(status) }
        lock.unlock()
    }

    private func publishStoppedStatus() {
        lock.lock()
        let current = generation
        lock.unlock()
        if let stopped = try? db.stoppedStatus() {
            publish(SyncStatus(stopped), from: current)
        }
    }

    /// After a commit while no sync runs: the stopped status's pending count.
    private func refreshStoppedStatus() {
        lock.lock()
        let idle = sync == nil && !closed && !refreshingStoppedStatus
        if idle { refreshingStoppedStatus = true }
        lock.unlock()
        guard idle else { return }
        lifecycle.addOperation {
            self.lock.lock()
            self.refreshingStoppedStatus = false
            let stillStopped = self.sync == nil
            self.lock.unlock()
            if stillStopped { self.publishStoppedStatus() }
        }
    }

    private func isClosed() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        return closed
    }

    /// Runs `work` on `queue`, after checking for Task cancellation and for
    /// a closed database.
    private func run<T>(_ queue: OperationQueue, checkingCancellation: Bool = true,
                        _ work: @escaping () throws -> T) async throws -> T {
        if checkingCancellation { try Task.checkCancellation() }
        if isClosed() { throw ConfluoError.Closed }
        return try await withCheckedThrowingContinuation { continuation in
            queue.addOperation { continuation.resume(with: Result { try work() }) }
        }
    }
}

/// The statements of a write transaction. Valid only inside `Confluo.write`.
public struct WriteScope {
    let tx: WriteTransaction

    @discardableResult
    public func execute(_ sql: String, _ args: Any?...) throws -> Int {
        Int(try tx.execute(sql: sql, params: try sqlValues(args)))
    }

    public func executeBatch(_ sql: String) throws {
        try tx.executeBatch(sql: sql)
    }

    public func query(_ sql: String, _ args: Any?...) throws -> [Row] {
        rows(try tx.query(sql: sql, params: try sqlValues(args)))
    }

    public func query<T: Decodable>(_ sql: String, _ args: Any?..., as type: T.Type) throws -> [T] {
        try rows(try tx.query(sql: sql, params: try sqlValues(args))).map { try $0.decode(type) }
    }
}

private final class WriteRunner<T>: TransactionBody, @unchecked Sendable {
    let body: (WriteScope) throws -> T
    var result: T?
    var failure: Error?

    init(_ body: @escaping (WriteScope) throws -> T) {
        self.body = body
    }

    func run(tx: WriteTransaction) throws {
        do {
            result = try body(WriteScope(tx: tx))
        } catch {
            failure = error
            throw ConfluoError.InvalidInput(detail: "the transaction's body threw: \(error)")
        }
    }
}

/// Re-runs a query after commits, one run at a time and in order: commits
/// during a run cause one more run, not one each.
private final class Rerun: @unchecked Sendable {
    private let lock = NSLock()
    private var running = false
    private var again = false
    private let queue: OperationQueue
    private let body: () -> Void

    init(queue: OperationQueue, _ body: @escaping () -> Void) {
        self.queue = queue
        self.body = body
    }

    func request() {
        lock.lock()
        defer { lock.unlock() }
        if running {
            again = true
            return
        }
        running = true
        queue.addOperation { self.loop() }
    }

    private func loop() {
        while true {
            body()
            lock.lock()
            if again {
                again = false
                lock.unlock()
            } else {
                running = false
                lock.unlock()
                return
            }
        }
    }
}

private final class ChangeRelay: ChangeListener, @unchecked Sendable {
    let changed: @Sendable ([String]) -> Void
    init(_ changed: @escaping @Sendable ([String]) -> Void) { self.changed = changed }
    func onChange(tables: [String]) throws { changed(tables) }
}

private final class StatusRelay: SyncStatusListener, @unchecked Sendable {
    let publish: (ConfluoFFI.SyncStatus) -> Void
    init(_ publish: @escaping (ConfluoFFI.SyncStatus) -> Void) { self.publish = publish }
    func onStatus(status: ConfluoFFI.SyncStatus) throws { publish(status) }
}
