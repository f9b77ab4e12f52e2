// Kotlin values to and from SQLite values, and the Row type queries return.
package dev.confluo

import dev.confluo.ffi.SqlValue
import java.time.Instant
import java.time.ZoneOffset
import java.time.format.DateTimeFormatter
import java.time.format.DateTimeParseException
import java.util.Date
import java.util.UUID

/**
 * Instants are stored as TEXT, ISO-8601 in UTC with exactly three
 * fractional digits (`2026-11-26T17:05:09.120Z`): the form the Swift SDK
 * writes too, so both read each other's rows, and text order is time order.
 */
private val instantText: DateTimeFormatter =
    DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSS'Z'").withZone(ZoneOffset.UTC)

internal fun instantToText(instant: Instant): String = instantText.format(instant)

/**
 * Kotlin values to SQLite values: null, whole numbers, booleans (0/1),
 * floating point, text, bytes; [Instant] and [Date] as ISO-8601 UTC text
 * with milliseconds; [UUID] as lowercase canonical text.
 */
internal fun toSql(value: Any?): SqlValue = when (value) {
    null -> SqlValue.Null
    is Long -> SqlValue.Integer(value)
    is Int -> SqlValue.Integer(value.toLong())
    is Short -> SqlValue.Integer(value.toLong())
    is Byte -> SqlValue.Integer(value.toLong())
    is Boolean -> SqlValue.Integer(if (value) 1L else 0L)
    is Double -> SqlValue.Real(value)
    is Float -> SqlValue.Real(value.toDouble())
    is String -> SqlValue.Text(value)
    is ByteArray -> SqlValue.Blob(value)
    is Instant -> SqlValue.Text(instantToText(value))
    is Date -> SqlValue.Text(instantToText(value.toInstant()))
    is UUID -> SqlValue.Text(value.toString().lowercase())
    is SqlValue -> value
    else -> throw ConfluoException.InvalidInput("cannot bind a ${value::class.qualifiedName} to SQL")
}

internal fun toSql(args: Array<out Any?>): List<SqlValue> = args.map(::toSql)

/** SQLite values to plain Kotlin values: null, Long, Double, String or ByteArray. */
internal fun fromSql(value: SqlValue): Any? = when (value) {
    is SqlValue.Null -> null
    is SqlValue.Integer -> value.value
    is SqlValue.Real -> value.value
    is SqlValue.Text -> value.value
    is SqlValue.Blob -> value.value
}

/**
 * One row of a query result, with typed accessors by column name.
 *
 * Rows are equal when they have the same columns and values (bytes compared
 * by content). Accessors throw [ConfluoException.InvalidInput] for a column
 * the query did not return, for NULL in a non-null accessor (the `OrNull`
 * variants return null instead) and for a value of another type.
 */
class Row internal constructor(
    private val index: Map<String, Int>,
    private val values: List<SqlValue>,
) {
    /** The column names, in query order. */
    val columns: List<String> get() = index.entries.sortedBy { it.value }.map { it.key }

    /** The value of [column] as a plain Kotlin value (null, Long, Double, String or ByteArray). */
    operator fun get(column: String): Any? = fromSql(raw(column))

    fun isNull(column: String): Boolean = raw(column) is SqlValue.Null

    fun stringOrNull(column: String): String? = when (val v = raw(column)) {
        is SqlValue.Null -> null
        is SqlValue.Text -> v.value
        is SqlValue.Integer -> v.value.toString()
        is SqlValue.Real -> v.value.toString()
        is SqlValue.Blob -> v.value.decodeToString()
    }

    fun string(column: String): String = stringOrNull(column) ?: nullValue(column)

    fun longOrNull(column: String): Long? = when (val v = raw(column)) {
        is SqlValue.Null -> null
        is SqlValue.Integer -> v.value
        is SqlValue.Real -> v.value.toLong()
        is SqlValue.Text -> v.value.toLongOrNull() ?: typeError(column, "a whole number")
        is SqlValue.Blob -> typeError(column, "a whole number")
    }

    fun long(column: String): Long = longOrNull(column) ?: nullValue(column)

    fun intOrNull(column: String): Int? = longOrNull(column)?.toInt()

    fun int(column: String): Int = long(column).toInt()

    fun doubleOrNull(column: String): Double? = when (val v = raw(column)) {
        is SqlValue.Null -> null
        is SqlValue.Integer -> v.value.toDouble()
        is SqlValue.Real -> v.value
        is SqlValue.Text -> v.value.toDoubleOrNull() ?: typeError(column, "a number")
        is SqlValue.Blob -> typeError(column, "a number")
    }

    fun double(column: String): Double = doubleOrNull(column) ?: nullValue(column)

    fun bytesOrNull(column: String): ByteArray? = when (val v = raw(column)) {
        is SqlValue.Null -> null
        is SqlValue.Blob -> v.value
        is SqlValue.Text -> v.value.encodeToByteArray()
        else -> typeError(column, "bytes")
    }

    fun bytes(column: String): ByteArray = bytesOrNull(column) ?: nullValue(column)

    /** SQLite has no booleans: 0 is false, any other number true. */
    fun booleanOrNull(column: String): Boolean? = longOrNull(column)?.let { it != 0L }

    fun boolean(column: String): Boolean = booleanOrNull(column) ?: nullValue(column)

    /** An instant stored as ISO-8601 text (as Confluo binds an [Instant] or a [Date]). */
    fun instantOrNull(column: String): Instant? = parsedOrNull(column, "an ISO-8601 instant", Instant::parse)

    fun instant(column: String): Instant = instantOrNull(column) ?: nullValue(column)

    fun dateOrNull(column: String): Date? = instantOrNull(column)?.let(Date::from)

    fun date(column: String): Date = Date.from(instant(column))

    /** A UUID stored as its canonical text (as Confluo binds a [UUID]). */
    fun uuidOrNull(column: String): UUID? = parsedOrNull(column, "a UUID", UUID::fromString)

    /** A text value read by [parse] (which throws on text it cannot read: a type error, like any other). */
    private inline fun <T> parsedOrNull(column: String, what: String, parse: (String) -> T): T? =
        when (val v = raw(column)) {
            is SqlValue.Null -> null
            is SqlValue.Text -> try {
                parse(v.value)
            } catch (e: DateTimeParseException) {
                typeError(column, what)
            } catch (e: IllegalArgumentException) {
                typeError(column, what)
            }
            else -> typeError(column, what)
        }

    fun uuid(column: String): UUID = uuidOrNull(column) ?: nullValue(column)

    override fun equals(other: Any?): Boolean {
        if (this === other) return true
        if (other !is Row || columns != other.columns) return false
        return values.indices.all { sameValue(values[it], other.values[it]) }
    }

    override fun hashCode(): Int = values.fold(columns.hashCode()) { hash, v ->
        31 * hash + when (v) {
            is SqlValue.Blob -> v.value.contentHashCode()
            else -> v.hashCode()
        }
    }

    override fun toString(): String = columns.joinToString(prefix = "Row(", postfix = ")") {
        val v = get(it)
        "$it=${if (v is ByteArray) v.contentToString() else v}"
    }

    private fun raw(column: String): SqlValue {
        val i = index[column] ?: throw ConfluoException.InvalidInput(
            "no column \"$column\" in this row (columns: ${columns.joinToString(", ")})",
        )
        return values[i]
    }

    private fun nullValue(column: String): Nothing = throw ConfluoException.InvalidInput("column \"$column\" is NULL")

    private fun typeError(column: String, wanted: String): Nothing =
        throw ConfluoException.InvalidInput("column \"$column\" does not hold $wanted")
}

/** Blobs by content (the generated value class compares arrays by identity); the rest as the engine gave them. */
private fun sameValue(a: SqlValue, b: SqlValue): Boolean =
    if (a is SqlValue.Blob && b is SqlValue.Blob) a.value.contentEquals(b.value) else a == b

internal fun rowsOf(result: dev.confluo.ffi.QueryResult): List<Row> {
    val index = result.columns.withIndex().associate { (i, name) -> name to i }
    return result.rows.map { Row(index, it) }
}
