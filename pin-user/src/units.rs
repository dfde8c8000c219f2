//! How durations are read from and shown to people, the same in every command.
use std::time::Duration;

/// "850ns", "1.5µs", "2.00ms", "1.250s".
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.3}s", ns as f64 / 1e9),
    }
}

/// Durations as humantime reads them ("5s", "200ms", "10us", "1.5m",
/// "1m30s"), or a bare number of seconds ("10", "0.5"), which pinguard has
/// always accepted and humantime does not.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare {
        humantime::parse_duration(&format!("{s}s"))
    } else {
        humantime::parse_duration(s)
    };
    parsed.map_err(|e| match e {
        // humantime's message lists the units already.
        humantime::DurationError::UnknownUnit { .. } => format!("invalid duration {s:?}: {e}"),
        e => format!(
            "invalid duration {s:?}: {e}; expected e.g. 5s, 200ms, 2m or a number of seconds"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(1_500), "1.5µs");
        assert_eq!(fmt_ns(2_000_000), "2.00ms");
        assert_eq!(fmt_ns(1_250_000_000), "1.250s");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration(" 10 ").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("1500ns").unwrap(),
            Duration::from_nanos(1500)
        );
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("2µs").unwrap(), Duration::from_micros(2));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        let e = parse_duration("5 parsecs").unwrap_err();
        assert!(e.contains("unit") && e.contains("5 parsecs"), "{e}");
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration(".").is_err());
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("expected e.g. 5s")
        );
    }
}
