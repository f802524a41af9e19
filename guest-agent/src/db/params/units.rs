//! Sizes and durations in each server's syntax, read and written exactly: PostgreSQL's
//! `kB`/`MB`/… units, MySQL's `K`/`M`/… suffixes, durations with `ms`…`d`. Decimal text is
//! scaled without floating point, so `1.5GB` is exactly 1536 MiB and `0.0001s` is refused
//! instead of rounded.

use super::spec::{Engine, TimeUnit};
use super::{quote, Value};

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;
pub(super) const TIB: u64 = 1 << 40;
pub(super) const SECOND_MS: u64 = 1_000;
pub(super) const MINUTE_MS: u64 = 60 * SECOND_MS;
pub(super) const HOUR_MS: u64 = 60 * MINUTE_MS;
pub(super) const DAY_MS: u64 = 24 * HOUR_MS;

pub(super) fn parse_real(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("{} is not a finite number", quote(text))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NumberError {
    NotANumber,
    Negative,
    NotWhole,
    TooLarge,
}

/// `text` (a non-negative decimal such as `1.5`) times `multiplier`, exactly; refused
/// when the result is not a whole number.
pub(super) fn scale_decimal(text: &str, multiplier: u64) -> Result<u64, NumberError> {
    let text = text.strip_prefix('+').unwrap_or(text);
    if text.starts_with('-') {
        return Err(NumberError::Negative);
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(NumberError::NotANumber);
    }
    let mut total: u128 = 0;
    for digit in whole.bytes() {
        total = total * 10 + u128::from(digit - b'0');
        if total > u128::from(u64::MAX) {
            return Err(NumberError::TooLarge);
        }
    }
    total = total
        .checked_mul(u128::from(multiplier))
        .ok_or(NumberError::TooLarge)?;
    let fraction = fraction.trim_end_matches('0');
    if !fraction.is_empty() {
        // 19 digits keep numerator below 10^19 * 2^64, well inside u128.
        let places = u32::try_from(fraction.len())
            .ok()
            .filter(|places| *places <= 19)
            .ok_or(NumberError::NotWhole)?;
        let denominator = 10u128.pow(places);
        let numerator = fraction
            .parse::<u128>()
            .map_err(|_| NumberError::NotANumber)?
            .checked_mul(u128::from(multiplier))
            .ok_or(NumberError::TooLarge)?;
        if numerator % denominator != 0 {
            return Err(NumberError::NotWhole);
        }
        total = total
            .checked_add(numerator / denominator)
            .ok_or(NumberError::TooLarge)?;
    }
    u64::try_from(total).map_err(|_| NumberError::TooLarge)
}

/// Splits `128MB` or `128 MB` into the number and the unit.
fn split_number_unit(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim_start())
}

/// How a size without a unit is read.
#[derive(Clone, Copy, Debug)]
pub(super) enum Bare {
    /// Refused unless zero: a request must say what it means.
    Refuse,
    /// Counted in this many bytes: the server's own reading.
    Times(u64),
}

pub(super) fn pg_memory_unit(unit: &str) -> Option<u64> {
    match unit {
        "B" => Some(1),
        "kB" => Some(KIB),
        "MB" => Some(MIB),
        "GB" => Some(GIB),
        "TB" => Some(TIB),
        _ => None,
    }
}

fn mysql_size_suffix(unit: &str) -> Option<u64> {
    match unit {
        "" => Some(1),
        "K" | "k" => Some(KIB),
        "M" | "m" => Some(MIB),
        "G" | "g" => Some(GIB),
        "T" | "t" => Some(TIB),
        _ => None,
    }
}

pub(super) fn time_unit_ms(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(SECOND_MS),
        "min" => Some(MINUTE_MS),
        "h" => Some(HOUR_MS),
        "d" => Some(DAY_MS),
        _ => None,
    }
}

pub(super) fn size_error(text: &str, error: NumberError, engine: Engine) -> String {
    let shown = quote(text);
    match error {
        NumberError::NotANumber => match engine {
            Engine::Postgres => format!("{shown} is not a size (e.g. \"128MB\")"),
            Engine::Mysql => format!("{shown} is not a size (e.g. \"128M\")"),
        },
        NumberError::Negative => format!("{shown} is negative"),
        NumberError::NotWhole => format!("{shown} is not a whole number of bytes"),
        NumberError::TooLarge => format!("{shown} is too large"),
    }
}

pub(super) fn parse_pg_size(text: &str, bare: Bare) -> Result<u64, String> {
    let (number, unit) = split_number_unit(text);
    if number.is_empty() {
        return Err(size_error(text, NumberError::NotANumber, Engine::Postgres));
    }
    let multiplier = if unit.is_empty() {
        match bare {
            Bare::Times(base) => base,
            Bare::Refuse if scale_decimal(number, 1) == Ok(0) => 1,
            Bare::Refuse => {
                return Err(format!(
                    "{} has no unit: give one of B, kB, MB, GB, TB (e.g. \"128MB\"), or a \
                     JSON number of bytes",
                    quote(text)
                ))
            }
        }
    } else {
        pg_memory_unit(unit).ok_or_else(|| {
            format!(
                "{} has an unknown unit {}: PostgreSQL sizes use B, kB, MB, GB or TB (case \
                 matters)",
                quote(text),
                quote(unit)
            )
        })?
    };
    scale_decimal(number, multiplier).map_err(|e| size_error(text, e, Engine::Postgres))
}

pub(super) fn parse_mysql_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(end);
    if number.is_empty() {
        return Err(size_error(text, NumberError::NotANumber, Engine::Mysql));
    }
    let multiplier = mysql_size_suffix(unit).ok_or_else(|| {
        format!(
            "{} is not a MySQL size: use a whole number of bytes with an optional K, M, G or \
             T suffix (e.g. \"128M\")",
            quote(text)
        )
    })?;
    scale_decimal(number, multiplier).map_err(|e| size_error(text, e, Engine::Mysql))
}

pub(super) fn parse_duration(
    text: &str,
    unit: TimeUnit,
    minus_one_disables: bool,
) -> Result<Value, String> {
    let trimmed = text.trim();
    if minus_one_disables && trimmed == "-1" {
        return Ok(Value::Disabled);
    }
    let (number, suffix) = split_number_unit(trimmed);
    if number.is_empty() {
        return Err(format!(
            "{} is not a duration (e.g. \"30s\" or \"5min\")",
            quote(text)
        ));
    }
    let multiplier = if suffix.is_empty() {
        unit.ms()
    } else {
        time_unit_ms(suffix).ok_or_else(|| {
            format!(
                "{} has an unknown unit {}: durations use ms, s, min, h or d (case matters)",
                quote(text),
                quote(suffix)
            )
        })?
    };
    scale_decimal(number, multiplier)
        .map(Value::DurationMs)
        .map_err(|e| {
            let shown = quote(text);
            match e {
                NumberError::NotANumber => {
                    format!("{shown} is not a duration (e.g. \"30s\" or \"5min\")")
                }
                NumberError::Negative if minus_one_disables => {
                    format!("{shown} is negative (only -1, which disables it, may be)")
                }
                NumberError::Negative => format!("{shown} is negative"),
                NumberError::NotWhole => format!("{shown} is not a whole number of milliseconds"),
                NumberError::TooLarge => format!("{shown} is too large"),
            }
        })
}

pub(super) fn pg_size_text(b: u64) -> String {
    if b == 0 {
        return "0".to_string();
    }
    for (unit, symbol) in [(TIB, "TB"), (GIB, "GB"), (MIB, "MB"), (KIB, "kB")] {
        if b.is_multiple_of(unit) {
            return format!("{}{symbol}", b / unit);
        }
    }
    format!("{b}B")
}

pub(super) fn mysql_size_text(b: u64) -> Option<String> {
    [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")]
        .into_iter()
        .find(|(unit, _)| b != 0 && b.is_multiple_of(*unit))
        .map(|(unit, symbol)| format!("{}{symbol}", b / unit))
}

pub(super) fn duration_text(ms: u64) -> String {
    if ms == 0 {
        return "0".to_string();
    }
    for (unit, symbol) in [
        (DAY_MS, "d"),
        (HOUR_MS, "h"),
        (MINUTE_MS, "min"),
        (SECOND_MS, "s"),
    ] {
        if ms.is_multiple_of(unit) {
            return format!("{}{symbol}", ms / unit);
        }
    }
    format!("{ms}ms")
}

pub(super) fn seconds_text(ms: u64) -> String {
    let (whole, rest) = (ms / SECOND_MS, ms % SECOND_MS);
    if rest == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{rest:03}")
            .trim_end_matches('0')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_decimal_scaling() {
        assert_eq!(scale_decimal("1.5", GIB), Ok(1536 * MIB));
        assert_eq!(scale_decimal(".5", SECOND_MS), Ok(500));
        assert_eq!(scale_decimal("10.000000", SECOND_MS), Ok(10_000));
        assert_eq!(
            scale_decimal("0.0001", SECOND_MS),
            Err(NumberError::NotWhole)
        );
        assert_eq!(scale_decimal(".", 1), Err(NumberError::NotANumber));
        assert_eq!(scale_decimal("1e5", 1), Err(NumberError::NotANumber));
        assert_eq!(scale_decimal("-1", 1), Err(NumberError::Negative));
        assert_eq!(
            scale_decimal("18446744073709551616", 1),
            Err(NumberError::TooLarge)
        );
        assert_eq!(scale_decimal("18446744073709551615", 1), Ok(u64::MAX));
        assert_eq!(
            scale_decimal("17179869184", GIB),
            Err(NumberError::TooLarge)
        );
    }
}
