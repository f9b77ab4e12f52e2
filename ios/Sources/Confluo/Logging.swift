import Foundation
import ConfluoFFI
#if canImport(os)
import os
#endif

/// How much a log message matters, most severe first.
public enum LogLevel: Int, Sendable, Comparable, CaseIterable {
    case error, warn, info, debug, trace

    public static func < (a: LogLevel, b: LogLevel) -> Bool { a.rawValue < b.rawValue }

    init(_ level: ConfluoFFI.LogLevel) {
        switch level {
        case .error: self = .error
        case .warn: self = .warn
        case .info: self = .info
        case .debug: self = .debug
        case .trace: self = .trace
        }
    }

    var ffi: ConfluoFFI.LogLevel {
        switch self {
        case .error: return .error
        case .warn: return .warn
        case .info: return .info
        case .debug: return .debug
        case .trace: return .trace
        }
    }
}

/// Receives the engine's log messages. Called on whatever thread logged,
/// sync threads included: return quickly and do not call back into Confluo.
public protocol ConfluoLogger: Sendable {
    func log(level: LogLevel, target: String, message: String)
}

extension Confluo {
    /// Sends the engine's messages of `level` and more severe to `logger`
    /// (replacing the one set before; one per process); `nil` turns logging off.
    public static func setLogger(_ logger: ConfluoLogger?, level: LogLevel = .info) {
        ConfluoFFI.setLogger(logger: logger.map(LogRelay.init), maxLevel: level.ffi)
    }
}

private final class LogRelay: ConfluoFFI.Logger, @unchecked Sendable {
    let logger: ConfluoLogger
    init(_ logger: ConfluoLogger) { self.logger = logger }
    func log(level: ConfluoFFI.LogLevel, target: String, message: String) throws {
        logger.log(level: LogLevel(level), target: target, message: message)
    }
}

#if canImport(os)
/// Writes the engine's messages to the unified log (Console.app, `log stream`).
/// Messages are marked public so they can be read outside a debugger.
public struct OSLogLogger: ConfluoLogger {
    private let logger: os.Logger

    public init(subsystem: String = "dev.confluo", category: String = "engine") {
        logger = os.Logger(subsystem: subsystem, category: category)
    }

    public func log(level: LogLevel, target: String, message: String) {
        switch level {
        case .error: logger.error("\(target, privacy: .public): \(message, privacy: .public)")
        case .warn: logger.warning("\(target, privacy: .public): \(message, privacy: .public)")
        case .info: logger.info("\(target, privacy: .public): \(message, privacy: .public)")
        case .debug, .trace: logger.debug("\(target, privacy: .public): \(message, privacy: .public)")
        }
    }
}
#endif
