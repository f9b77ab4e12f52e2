import Foundation
import ConfluoFFI

/// Converts Swift values to SQLite values: `nil`, integers, `Bool` (0/1),
/// floating point, `String`, `Data`.
func sqlValue(_ value: Any?) throws -> SqlValue {
    switch value {
    case nil: return .null
    case let v as SqlValue: return v
    case let v as Int: return .integer(value: Int64(v))
    case let v as Int64: return .integer(value: v)
    case let v as Int32: return .integer(value: Int64(v))
    case let v as Bool: return .integer(value: v ? 1 : 0)
    case let v as Double: return .real(value: v)
    case let v as Float: return .real(value: Double(v))
    case let v as String: return .text(value: v)
    case let v as Data: return .blob(value: v)
    case let v as [UInt8]: return .blob(value: Data(v))
    default: throw ConfluoError.InvalidInput(detail: "cannot bind a \(type(of: value!)) to SQL")
    }
}

func sqlValues(_ args: [Any?]) throws -> [SqlValue] {
    try args.map(sqlValue)
}

/// One row of a query result, with typed accessors by column name. They
/// return `nil` for NULL and for a column the query did not return.
public struct Row: Sendable, CustomStringConvertible {
    /// The column names, in query order.
    public let columns: [String]
    let values: [SqlValue]

    init(columns: [String], values: [SqlValue]) {
        self.columns = columns
        self.values = values
    }

    func raw(_ column: String) -> SqlValue? {
        columns.firstIndex(of: column).map { values[$0] }
    }

    /// Whether `column` holds NULL.
    public func isNull(_ column: String) -> Bool {
        if case .null = raw(column) { return true }
        return false
    }

    public func string(_ column: String) -> String? {
        switch raw(column) {
        case .text(let v): return v
        case .integer(let v): return String(v)
        case .real(let v): return String(v)
        case .blob(let v): return String(data: v, encoding: .utf8)
        default: return nil
        }
    }

    public func int64(_ column: String) -> Int64? {
        switch raw(column) {
        case .integer(let v): return v
        case .real(let v): return Int64(exactly: v.rounded(.towardZero))
        case .text(let v): return Int64(v)
        default: return nil
        }
    }

    public func int(_ column: String) -> Int? { int64(column).map(Int.init) }

    public func double(_ column: String) -> Double? {
        switch raw(column) {
        case .integer(let v): return Double(v)
        case .real(let v): return v
        case .text(let v): return Double(v)
        default: return nil
        }
    }

    public func data(_ column: String) -> Data? {
        switch raw(column) {
        case .blob(let v): return v
        case .text(let v): return Data(v.utf8)
        default: return nil
        }
    }

    /// SQLite has no booleans: 0 is false, any other number true.
    public func bool(_ column: String) -> Bool? { int64(column).map { $0 != 0 } }

    public var description: String {
        "Row(" + columns.map { "\($0)=\(string($0) ?? "NULL")" }.joined(separator: ", ") + ")"
    }
}

func rows(_ result: QueryResult) -> [Row] {
    result.rows.map { Row(columns: result.columns, values: $0) }
}
