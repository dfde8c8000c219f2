//! How durations are shown to people, the same in every command.

/// "850ns", "1.5µs", "2.00ms", "1.250s".
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.1}µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.3}s", ns as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_ns;

    #[test]
    fn units() {
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(1_500), "1.5µs");
        assert_eq!(fmt_ns(2_000_000), "2.00ms");
        assert_eq!(fmt_ns(1_250_000_000), "1.250s");
    }
}
