import Foundation
import ConfluoFFI

/// The SDK's error: invalid input, schema, storage (with SQLite's message),
/// network (retryable or not), auth, or closed.
public typealias ConfluoError = ConfluoFFI.ConfluoError

/// One SQLite value (null, integer, real, text or blob), as a rejected
/// change's key holds them.
public typealias SqlValue = ConfluoFFI.SqlValue

/// A Confluo database: an ordinary SQLite database whose synced tables
/// converge across devices.
///
/// Every method that touches the database is `async` and runs off the
/// caller's thread, so it is safe to call from the main actor.
public final class Confluo: @unchecked Sendable {
    private let db: Database
    private let lock = NSLock()
    /// Serializes starting and stopping sync (stopping takes up to a second).
    private let syncChanges = NSLock()
    private var sync: BackgroundSync?
    private var statusContinuations: [UUID: AsyncStream<SyncStatus>.Continuation] = [:]
    private var lastStatus = SyncStatus(state: .idle, pending: 0, lastSynced: nil)

    private init(_ db: Database) {
        self.db = db
    }

    /// Opens (creating if needed) the database file at `path`.
    public static func open(path: String) throws -> Confluo {
        Confluo(try Database.open(path: path))
    }

    /// Opens a private in-memory database (for tests and previews).
    public static func openInMemory() throws -> Confluo {
        Confluo(try Database.openInMemory())
    }

    /// This database's site id (a UUID), created once and kept in the file.
    public var siteId: String { db.siteId() }

    /// Runs one statement in its own transaction; returns the rows changed.
    @discardableResult
    public func execute(_ sql: String, _ args: Any?...) async throws -> Int {
        let params = try sqlValues(args)
        return try await background { Int(try self.db.execute(sql: sql, params: params)) }
    }

    /// Runs several statements (a migration, say) in one transaction.
    public func executeBatch(_ sql: String) async throws {
        try await background { try self.db.executeBatch(sql: sql) }
    }

    /// Runs a query; read-only queries never wait behind a write.
    public func query(_ sql: String, _ args: Any?...) async throws -> [Row] {
        let params = try sqlValues(args)
        return try await background { rows(try self.db.query(sql: sql, params: params)) }
    }

    /// Runs `body` in one write transaction: committed when it returns,
    /// rolled back when it throws (the error is rethrown). `body` runs on the
    /// database's thread and must not keep the `Transaction`.
    public func write<T>(_ body: @escaping (Transaction) throws -> T) async throws -> T {
        try await background {
            let runner = TransactionRunner(body)
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
        try await background { try self.db.enableSync(table: table) }
    }

    /// Runs a schema migration of a synced table and re-installs its tracking.
    public func alterSyncedTable(_ table: String, _ sql: String) async throws {
        try await background { try self.db.alterSyncedTable(table: table, sql: sql) }
    }

    /// Makes `table` synced and brings it to the end of its history: `create`
    /// is the statement that first made it, `migrations` every later change
    /// of it in order (the same lists on every install). Whether the table is
    /// missing, older, or made directly in its latest shape by a new install,
    /// it ends with the columns (and column identities) the whole history
    /// gives; only the migrations it lacks run, so call it at every start.
    public func enableSyncWithHistory(_ table: String, create: String, migrations: [String]) async throws {
        try await background {
            try self.db.enableSyncWithHistory(table: table, create: create, migrations: migrations)
        }
    }

    /// Rows with local changes the sync server has not accepted yet.
    public func pendingChanges() async throws -> Int {
        try await background { Int(try self.db.pendingChanges()) }
    }

    /// The changes from the server kept aside because this database could
    /// not apply them.
    public func rejectedChanges() async throws -> [RejectedChange] {
        try await background { try self.db.rejectedChanges().map(RejectedChange.init) }
    }

    /// How many changes are kept aside (see `rejectedChanges()`).
    public func rejectedCount() async throws -> Int {
        try await background { Int(try self.db.rejectedCount()) }
    }

    /// The result of `sql` now, and again after every commit (local or synced)
    /// that changes any of `tables` (every table when empty).
    public func watch(_ sql: String, _ args: Any?..., tables: [String] = []) -> AsyncThrowingStream<[Row], Error> {
        let params: [SqlValue]
        do {
            params = try sqlValues(args)
        } catch {
            return AsyncThrowingStream { $0.finish(throwing: error) }
        }
        let db = self.db
        return AsyncThrowingStream(bufferingPolicy: .bufferingNewest(1)) { continuation in
            let queue = DispatchQueue(label: "dev.confluo.watch")
            let emit: @Sendable () -> Void = {
                queue.async {
                    do {
                        continuation.yield(rows(try db.query(sql: sql, params: params)))
                    } catch {
                        continuation.finish(throwing: error)
                    }
                }
            }
            let observer = db.observe(tables: tables, listener: ChangeRelay(emit))
            emit()
            continuation.onTermination = { _ in observer.cancel() }
        }
    }

    /// Syncs once with the server: pushes, then pulls until caught up.
    public func syncNow(_ options: SyncOptions, token: @escaping @Sendable () throws -> String) async throws -> SyncReport {
        try await background {
            SyncReport(try self.db.syncNow(config: options.ffi, token: TokenRelay(token), cancellation: nil))
        }
    }

    /// Background sync's status, as a stream: the current status first, then
    /// every change.
    public var syncStatus: AsyncStream<SyncStatus> {
        AsyncStream { continuation in
            let id = UUID()
            lock.lock()
            statusContinuations[id] = continuation
            let current = lastStatus
            lock.unlock()
            continuation.yield(current)
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
    /// backoff. Its status flows into `syncStatus`.
    public func startSync(_ options: SyncOptions, token: @escaping @Sendable () throws -> String) async throws {
        try await background {
            self.syncChanges.lock()
            defer { self.syncChanges.unlock() }
            self.stopSyncNow()
            let started = try self.db.startSync(config: options.ffi, token: TokenRelay(token),
                                                listener: StatusRelay { [weak self] in self?.publish(SyncStatus($0)) })
            self.lock.lock()
            self.sync = started
            self.lock.unlock()
        }
    }

    /// The platform's network hint (e.g. from NWPathMonitor).
    public func setOnline(_ online: Bool) {
        lock.lock()
        let s = sync
        lock.unlock()
        s?.setOnline(online: online)
    }

    /// Syncs now, skipping any backoff.
    public func syncSoon() {
        lock.lock()
        let s = sync
        lock.unlock()
        s?.syncSoon()
    }

    /// Stops background sync (within about a second, off the caller's thread).
    public func stopSync() async {
        try? await background {
            self.syncChanges.lock()
            defer { self.syncChanges.unlock() }
            self.stopSyncNow()
        }
    }

    private func stopSyncNow() {
        lock.lock()
        let s = sync
        sync = nil
        lock.unlock()
        s?.stop()
    }

    /// Everything recorded after `since`, encoded (peer-to-peer sync).
    public func changesSince(_ since: UInt64) async throws -> Data {
        try await background { try self.db.changesSince(since: since) }
    }

    /// What peer `peerSiteId` misses, given what it has seen from us.
    public func changesForPeer(_ peerSiteId: String, seenByPeer: UInt64) async throws -> Data {
        try await background { try self.db.changesForPeer(peerSiteId: peerSiteId, seenByPeer: seenByPeer) }
    }

    /// How much of `peerSiteId`'s history this database has received.
    public func seenVersion(_ peerSiteId: String) async throws -> UInt64 {
        try await background { try self.db.seenVersion(peerSiteId: peerSiteId) }
    }

    /// Merges an encoded change set; returns how many changes won.
    @discardableResult
    public func applyChanges(_ changeset: Data) async throws -> Int {
        try await background { Int(try self.db.applyChanges(changeset: changeset).applied) }
    }

    /// Stops sync and closes the database; the file can be opened again.
    public func close() throws {
        stopSyncNow()
        lock.lock()
        let continuations = statusContinuations.values
        statusContinuations = [:]
        lock.unlock()
        continuations.forEach { $0.finish() }
        try db.closeDatabase()
    }

    private func publish(_ status: SyncStatus) {
        lock.lock()
        lastStatus = status
        let continuations = Array(statusContinuations.values)
        lock.unlock()
        continuations.forEach { $0.yield(status) }
    }

    private func background<T>(_ work: @escaping () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global(qos: .userInitiated).async {
                continuation.resume(with: Result { try work() })
            }
        }
    }
}

/// The statements of a write transaction. Valid only inside `Confluo.write`.
public struct Transaction {
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
}

private final class TransactionRunner<T>: TransactionBody, @unchecked Sendable {
    let body: (Transaction) throws -> T
    var result: T?
    var failure: Error?

    init(_ body: @escaping (Transaction) throws -> T) {
        self.body = body
    }

    func run(tx: WriteTransaction) throws {
        do {
            result = try body(Transaction(tx: tx))
        } catch {
            failure = error
            throw ConfluoError.InvalidInput(detail: "the transaction's body threw: \(error)")
        }
    }
}

private final class ChangeRelay: ChangeListener, @unchecked Sendable {
    let emit: @Sendable () -> Void
    init(_ emit: @escaping @Sendable () -> Void) { self.emit = emit }
    func onChange(tables: [String]) throws { emit() }
}

private final class TokenRelay: TokenProvider, @unchecked Sendable {
    let supply: @Sendable () throws -> String
    init(_ supply: @escaping @Sendable () throws -> String) { self.supply = supply }
    func token(invalidate: Bool) throws -> String {
        do {
            return try supply()
        } catch {
            throw ConfluoError.Auth(detail: "no token: \(error)")
        }
    }
}

private final class StatusRelay: SyncStatusListener, @unchecked Sendable {
    let publish: (ConfluoFFI.SyncStatus) -> Void
    init(_ publish: @escaping (ConfluoFFI.SyncStatus) -> Void) { self.publish = publish }
    func onStatus(status: ConfluoFFI.SyncStatus) throws { publish(status) }
}
