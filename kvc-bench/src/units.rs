//! Human sizes on the command line: token counts such as `32k`, `3M` or `32Ki`, and byte sizes
//! such as `80GiB`, `141GB` or `512MiB`.
//!
//! The suffixes follow the SI and IEC conventions, so a size means one thing:
//!
//! | suffix | factor | example |
//! |---|---|---|
//! | `k` / `K`, `M`, `G`, `T` | 10³, 10⁶, 10⁹, 10¹² | `3M` = 3,000,000 |
//! | `Ki`, `Mi`, `Gi`, `Ti` | 2¹⁰, 2²⁰, 2³⁰, 2⁴⁰ | `32Ki` = 32,768 |
//!
//! Byte sizes take the same prefixes followed by `B` (`80GB` = 80·10⁹ bytes, `80GiB` =
//! 80·2³⁰ bytes); a bare number is bytes. A decimal point is allowed before a suffix
//! (`1.5M` = 1,500,000) as long as the result is a whole number; `_` separates digits
//! (`3_000_000`).
//!
//! ```
//! use kvc_bench::units::{parse_bytes, parse_count};
//!
//! assert_eq!(parse_count("32k")?, 32_000);
//! assert_eq!(parse_count("32Ki")?, 32_768);
//! assert_eq!(parse_count("3M")?, 3_000_000);
//! assert_eq!(parse_bytes("80GiB")?, 80 << 30);
//! assert_eq!(parse_bytes("141GB")?, 141_000_000_000);
//! # Ok::<(), kvc_bench::units::UnitError>(())
//! ```

use thiserror::Error;

/// Why a size could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UnitError {
    /// The text is not a number with an optional suffix.
    #[error(
        "`{text}` is not a {what} (examples: {examples}; k/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)"
    )]
    Malformed {
        /// The text given.
        text: String,
        /// "token count" or "byte size".
        what: &'static str,
        /// Examples of valid input.
        examples: &'static str,
    },
    /// The value does not fit in 64 bits.
    #[error("`{text}` is larger than {max}")]
    TooLarge {
        /// The text given.
        text: String,
        /// The largest value.
        max: u64,
    },
    /// A fractional value does not come out whole.
    #[error("`{text}` is not a whole number")]
    Fraction {
        /// The text given.
        text: String,
    },
}

const PREFIXES: [(&str, u64); 8] = [
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
];
const TERA: (&str, u64) = ("T", 1_000_000_000_000);

/// Reads a token count or another plain count: `32000`, `32k`, `32Ki`, `3M`, `1.5M`.
pub fn parse_count(text: &str) -> Result<u64, UnitError> {
    parse(text, "", "token count", "32k, 32Ki, 3M, 131072")
}

/// Reads a byte size: `80GiB`, `141GB`, `512MiB`, or a bare number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    parse(text, "B", "byte size", "80GiB, 141GB, 512MiB")
}

fn parse(
    text: &str,
    unit: &str,
    what: &'static str,
    examples: &'static str,
) -> Result<u64, UnitError> {
    let malformed = || UnitError::Malformed {
        text: text.to_owned(),
        what,
        examples,
    };
    let trimmed = text.trim();
    let body = if unit.is_empty() {
        trimmed
    } else {
        trimmed.strip_suffix(unit).unwrap_or(trimmed)
    };
    let (number, factor) = PREFIXES
        .iter()
        .chain(std::iter::once(&TERA))
        .find_map(|&(p, f)| body.strip_suffix(p).map(|n| (n, f)))
        .unwrap_or((body, 1));
    // A bare number of bytes may not carry a prefix-less `B` twice, and a count may not
    // carry `B` at all: `3MB` is a byte size, not a token count.
    let number = number.trim_end().replace('_', "");
    if number.is_empty()
        || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || number.bytes().filter(|&b| b == b'.').count() > 1
        || number.starts_with('.')
        || number.ends_with('.')
    {
        return Err(malformed());
    }
    let too_large = || UnitError::TooLarge {
        text: text.to_owned(),
        max: u64::MAX,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((&number, ""));
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut value = u128::from(whole) * u128::from(factor);
    if !frac.is_empty() {
        let digits = u32::try_from(frac.len()).map_err(|_| malformed())?;
        let scale = 10u128.checked_pow(digits).ok_or_else(malformed)?;
        let frac: u128 = frac.parse().map_err(|_| malformed())?;
        let scaled = frac * u128::from(factor);
        if !scaled.is_multiple_of(scale) {
            return Err(UnitError::Fraction {
                text: text.to_owned(),
            });
        }
        value += scaled / scale;
    }
    u64::try_from(value).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_use_si_and_iec_prefixes() {
        for (text, want) in [
            ("0", 0),
            ("131072", 131_072),
            ("32k", 32_000),
            ("32K", 32_000),
            ("32Ki", 32_768),
            ("3M", 3_000_000),
            ("3Mi", 3 << 20),
            ("1.5M", 1_500_000),
            ("2G", 2_000_000_000),
            ("1T", 1_000_000_000_000),
            ("3_000_000", 3_000_000),
            (" 8k ", 8_000),
        ] {
            assert_eq!(parse_count(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bytes_take_a_b_suffix() {
        for (text, want) in [
            ("80GiB", 80u64 << 30),
            ("80GB", 80_000_000_000),
            ("141G", 141_000_000_000),
            ("512MiB", 512 << 20),
            ("1024", 1024),
            ("1024B", 1024),
            ("0.5GiB", 1 << 29),
        ] {
            assert_eq!(parse_bytes(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_named_errors() {
        for text in [
            "",
            "k",
            "32x",
            "-3",
            "3MB",
            "1e12",
            "1..5k",
            ".5k",
            "32 tokens",
        ] {
            assert!(
                matches!(parse_count(text), Err(UnitError::Malformed { .. })),
                "{text}: {:?}",
                parse_count(text)
            );
        }
        assert!(matches!(
            parse_count("1.0001k"),
            Err(UnitError::Fraction { .. })
        ));
        assert!(matches!(
            parse_count("18446744073709551616"),
            Err(UnitError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_bytes("20000000TiB"),
            Err(UnitError::TooLarge { .. })
        ));
        let msg = parse_count("32x").unwrap_err().to_string();
        assert!(msg.contains("32k") && msg.contains("1024"), "{msg}");
    }
}
