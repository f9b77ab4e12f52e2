package dev.confluo

import dev.confluo.ffi.SqlValue

/** Kotlin values to SQLite values: null, whole numbers, booleans (0/1), floating point, text, bytes. */
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
    is SqlValue -> value
    else -> throw IllegalArgumentException("cannot bind a ${value::class.simpleName} to SQL")
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
 * The non-null accessors throw [IllegalStateException] when the value is NULL;
 * the `OrNull` variants return null instead. Accessors throw
 * [IllegalArgumentException] for a column the query did not return.
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

    override fun toString(): String = columns.joinToString(prefix = "Row(", postfix = ")") { "$it=${get(it)}" }

    private fun raw(column: String): SqlValue {
        val i = index[column] ?: throw IllegalArgumentException("no column \"$column\" in ${index.keys}")
        return values[i]
    }

    private fun nullValue(column: String): Nothing = throw IllegalStateException("column \"$column\" is NULL")

    private fun typeError(column: String, wanted: String): Nothing =
        throw IllegalStateException("column \"$column\" does not hold $wanted")
}

internal fun rowsOf(result: dev.confluo.ffi.QueryResult): List<Row> {
    val index = result.columns.withIndex().associate { (i, name) -> name to i }
    return result.rows.map { Row(index, it) }
}
