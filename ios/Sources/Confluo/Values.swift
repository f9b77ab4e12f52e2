import Foundation
import ConfluoFFI

/// Converts Swift values to SQLite values: `nil`, integers, `Bool` (0/1),
/// floating point, `String`, `Data`, `Date` and `UUID` (as TEXT, in the
/// forms the Kotlin SDK writes too, so both read each other's rows).
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
    case let v as Data: return .blob(value: Data(v))
    case let v as [UInt8]: return .blob(value: Data(v))
    case let v as Date: return .text(value: SqlText.date(v))
    case let v as UUID: return .text(value: SqlText.uuid(v))
    default: throw ConfluoError.InvalidInput(detail: "cannot bind a \(type(of: value!)) to SQL")
    }
}

func sqlValues(_ args: [Any?]) throws -> [SqlValue] {
    try args.map(sqlValue)
}

/// The TEXT forms of dates and UUIDs shared with the Kotlin SDK.
enum SqlText {
    private static let utc: Calendar = {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(secondsFromGMT: 0)!
        return calendar
    }()

    /// ISO-8601 in UTC with exactly three fractional digits, e.g.
    /// `2026-11-26T17:05:09.120Z`: text order is time order. A `Date` is a
    /// Double, so it is rounded to the nearest millisecond (truncating
    /// could turn .120 stored as .11999... into .119).
    static func date(_ date: Date) -> String {
        let millis = Int64((date.timeIntervalSince1970 * 1000).rounded())
        let seconds = millis.floorDiv(1000)
        let fraction = millis - seconds * 1000
        let day = utc.dateComponents([.year, .month, .day, .hour, .minute, .second],
                                     from: Date(timeIntervalSince1970: TimeInterval(seconds)))
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", day.year!, day.month!, day.day!,
                      day.hour!, day.minute!, day.second!, Int(fraction))
    }

    /// Reads what `date(_:)` writes (and other ISO-8601 UTC forms).
    static func date(from text: String) -> Date? {
        let parts = text.split(separator: ".", maxSplits: 1)
        let whole = parts[0].hasSuffix("Z") ? String(parts[0].dropLast()) : String(parts[0])
        let numbers = whole.split(whereSeparator: { "-T:".contains($0) }).compactMap { Int($0) }
        guard numbers.count == 6, whole.count == 19, text.hasSuffix("Z") else { return nil }
        var millis = 0
        if parts.count == 2 {
            let digits = parts[1].dropLast().prefix(3)
            guard !digits.isEmpty, let value = Int(digits), parts[1].dropLast().allSatisfy(\.isNumber) else { return nil }
            millis = value * [100, 10, 1][digits.count - 1]
        }
        let components = DateComponents(year: numbers[0], month: numbers[1], day: numbers[2],
                                        hour: numbers[3], minute: numbers[4], second: numbers[5])
        guard let start = utc.date(from: components) else { return nil }
        let total = Int64(start.timeIntervalSince1970.rounded()) * 1000 + Int64(millis)
        return Date(timeIntervalSince1970: TimeInterval(total) / 1000)
    }

    /// Lowercase canonical form (Foundation's `uuidString` is uppercase).
    static func uuid(_ uuid: UUID) -> String { uuid.uuidString.lowercased() }
}

private extension Int64 {
    func floorDiv(_ d: Int64) -> Int64 {
        let q = self / d
        return (self % d != 0 && (self < 0) != (d < 0)) ? q - 1 : q
    }
}

/// One row of a query result, with typed accessors by column name. They
/// return `nil` for NULL and throw `ConfluoError.InvalidInput` for a column
/// the row does not have (a misspelling must not read as NULL).
public struct Row: Sendable, Equatable, CustomStringConvertible {
    /// The column names, in query order.
    public let columns: [String]
    let values: [SqlValue]

    init(columns: [String], values: [SqlValue]) {
        self.columns = columns
        self.values = values
    }

    /// The raw SQLite value of `column`.
    public func value(_ column: String) throws -> SqlValue {
        guard let index = columns.firstIndex(of: column) else { throw Row.noColumn(column, in: columns) }
        return values[index]
    }

    static func noColumn(_ column: String, in columns: [String]) -> ConfluoError {
        .InvalidInput(detail: "no column \"\(column)\" in this row (columns: \(columns.joined(separator: ", ")))")
    }

    /// Whether `column` holds NULL.
    public func isNull(_ column: String) throws -> Bool {
        if case .null = try value(column) { return true }
        return false
    }

    public func string(_ column: String) throws -> String? {
        switch try value(column) {
        case .text(let v): return v
        case .integer(let v): return String(v)
        case .real(let v): return String(v)
        case .blob(let v): return String(data: v, encoding: .utf8)
        case .null: return nil
        }
    }

    public func int64(_ column: String) throws -> Int64? {
        switch try value(column) {
        case .integer(let v): return v
        case .real(let v): return Int64(exactly: v.rounded(.towardZero))
        case .text(let v): return Int64(v)
        case .blob, .null: return nil
        }
    }

    public func int(_ column: String) throws -> Int? { try int64(column).map(Int.init) }

    public func double(_ column: String) throws -> Double? {
        switch try value(column) {
        case .integer(let v): return Double(v)
        case .real(let v): return v
        case .text(let v): return Double(v)
        case .blob, .null: return nil
        }
    }

    public func data(_ column: String) throws -> Data? {
        switch try value(column) {
        case .blob(let v): return v
        case .text(let v): return Data(v.utf8)
        case .integer, .real, .null: return nil
        }
    }

    /// SQLite has no booleans: 0 is false, any other number true.
    public func bool(_ column: String) throws -> Bool? { try int64(column).map { $0 != 0 } }

    /// A date written as a parameter (ISO-8601 UTC text).
    public func date(_ column: String) throws -> Date? {
        guard let text = try string(column) else { return nil }
        guard let date = SqlText.date(from: text) else {
            throw ConfluoError.InvalidInput(detail: "column \"\(column)\" holds \(text.debugDescription), not an ISO-8601 UTC date")
        }
        return date
    }

    /// A UUID written as a parameter (canonical text).
    public func uuid(_ column: String) throws -> UUID? {
        guard let text = try string(column) else { return nil }
        guard let uuid = UUID(uuidString: text) else {
            throw ConfluoError.InvalidInput(detail: "column \"\(column)\" holds \(text.debugDescription), not a UUID")
        }
        return uuid
    }

    /// Maps this row to `type`, one property per column name.
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try T(from: RowDecoder(row: self))
    }

    public var description: String {
        "Row(" + zip(columns, values).map { name, value in
            if case .null = value { return "\(name)=NULL" }
            return "\(name)=\((try? string(name)).flatMap { $0 } ?? "NULL")"
        }.joined(separator: ", ") + ")"
    }
}

func rows(_ result: QueryResult) -> [Row] {
    result.rows.map { Row(columns: result.columns, values: $0) }
}

/// Decodes one row: each property reads the column of its name through
/// `Row`'s getters, so types convert (and columns go missing) the same way.
struct RowDecoder: Decoder {
    let row: Row
    var codingPath: [CodingKey] = []
    var userInfo: [CodingUserInfoKey: Any] = [:]

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        KeyedDecodingContainer(Columns<Key>(row: row))
    }

    func unkeyedContainer() throws -> UnkeyedDecodingContainer {
        throw ConfluoError.InvalidInput(detail: "a row decodes into a type with named properties, not a list")
    }

    func singleValueContainer() throws -> SingleValueDecodingContainer {
        throw ConfluoError.InvalidInput(detail: "a row decodes into a type with named properties, not a single value")
    }

    struct Columns<Key: CodingKey>: KeyedDecodingContainerProtocol {
        let row: Row
        var codingPath: [CodingKey] = []
        var allKeys: [Key] { row.columns.compactMap(Key.init(stringValue:)) }

        // Every key is "present": an optional property whose column is
        // missing then fails in decodeNil instead of quietly reading nil.
        func contains(_ key: Key) -> Bool { true }

        func decodeNil(forKey key: Key) throws -> Bool { try row.isNull(key.stringValue) }

        private func required<T>(_ value: T?, _ key: Key) throws -> T {
            guard let value else {
                throw ConfluoError.InvalidInput(detail: "column \"\(key.stringValue)\" is NULL or not a \(T.self)")
            }
            return value
        }

        func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try required(row.bool(key.stringValue), key) }
        func decode(_ type: String.Type, forKey key: Key) throws -> String { try required(row.string(key.stringValue), key) }
        func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try required(row.double(key.stringValue), key) }
        func decode(_ type: Float.Type, forKey key: Key) throws -> Float { Float(try decode(Double.self, forKey: key)) }
        func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try integer(key) }
        func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try integer(key) }
        func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try integer(key) }
        func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try integer(key) }
        func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try integer(key) }
        func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try integer(key) }
        func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try integer(key) }
        func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try integer(key) }
        func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try integer(key) }
        func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try integer(key) }

        private func integer<T: FixedWidthInteger>(_ key: Key) throws -> T {
            let value = try required(row.int64(key.stringValue), key)
            guard let exact = T(exactly: value) else {
                throw ConfluoError.InvalidInput(detail: "column \"\(key.stringValue)\" holds \(value), out of range for \(T.self)")
            }
            return exact
        }

        func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
            let name = key.stringValue
            if type == Date.self { return try required(row.date(name), key) as! T }
            if type == UUID.self { return try required(row.uuid(name), key) as! T }
            if type == Data.self { return try required(row.data(name), key) as! T }
            // Anything else (an enum with a raw value, say) decodes from the
            // column's single value.
            return try T(from: ColumnDecoder(row: row, column: name))
        }

        func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws
            -> KeyedDecodingContainer<NestedKey> {
            throw ConfluoError.InvalidInput(detail: "column \"\(key.stringValue)\" cannot hold a nested object")
        }

        func nestedUnkeyedContainer(forKey key: Key) throws -> UnkeyedDecodingContainer {
            throw ConfluoError.InvalidInput(detail: "column \"\(key.stringValue)\" cannot hold a list")
        }

        func superDecoder() throws -> Decoder { RowDecoder(row: row) }
        func superDecoder(forKey key: Key) throws -> Decoder { RowDecoder(row: row) }
    }
}

/// One column as a single value, for `RawRepresentable` enums and wrappers.
private struct ColumnDecoder: Decoder, SingleValueDecodingContainer {
    let row: Row
    let column: String
    var codingPath: [CodingKey] = []
    var userInfo: [CodingUserInfoKey: Any] = [:]

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        throw ConfluoError.InvalidInput(detail: "column \"\(column)\" cannot hold a nested object")
    }

    func unkeyedContainer() throws -> UnkeyedDecodingContainer {
        throw ConfluoError.InvalidInput(detail: "column \"\(column)\" cannot hold a list")
    }

    func singleValueContainer() throws -> SingleValueDecodingContainer { self }

    private func required<T>(_ value: T?) throws -> T {
        guard let value else { throw ConfluoError.InvalidInput(detail: "column \"\(column)\" is NULL or not a \(T.self)") }
        return value
    }

    func decodeNil() -> Bool { (try? row.isNull(column)) ?? false }
    func decode(_ type: Bool.Type) throws -> Bool { try required(row.bool(column)) }
    func decode(_ type: String.Type) throws -> String { try required(row.string(column)) }
    func decode(_ type: Double.Type) throws -> Double { try required(row.double(column)) }
    func decode(_ type: Float.Type) throws -> Float { Float(try required(row.double(column))) }
    func decode(_ type: Int.Type) throws -> Int { try integer() }
    func decode(_ type: Int8.Type) throws -> Int8 { try integer() }
    func decode(_ type: Int16.Type) throws -> Int16 { try integer() }
    func decode(_ type: Int32.Type) throws -> Int32 { try integer() }
    func decode(_ type: Int64.Type) throws -> Int64 { try integer() }
    func decode(_ type: UInt.Type) throws -> UInt { try integer() }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try integer() }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try integer() }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try integer() }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try integer() }

    private func integer<T: FixedWidthInteger>() throws -> T {
        let value = try required(row.int64(column))
        guard let exact = T(exactly: value) else {
            throw ConfluoError.InvalidInput(detail: "column \"\(column)\" holds \(value), out of range for \(T.self)")
        }
        return exact
    }

    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        if type == Date.self { return try required(row.date(column)) as! T }
        if type == UUID.self { return try required(row.uuid(column)) as! T }
        if type == Data.self { return try required(row.data(column)) as! T }
        return try T(from: self)
    }
}
