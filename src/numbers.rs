//! How numbers are printed, one way per quantity, so that a KL or a scale reads the same in every
//! subcommand's table and in every message: [`sci`] for quantities that span decades (KL
//! divergences), [`short`] for exact small numbers (alpha, scale, budgets).

/// Four significant digits: plain between 0.001 and 9999 (`0.1110`, `1.363`, `42.00`), otherwise
/// as a mantissa and a signed two-digit exponent (`2.400e-05`); `0`, `inf`, `nan` as such.
pub fn sci(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let e = x.abs().log10().floor() as i32;
    if (-3..4).contains(&e) {
        let decimals = (3 - e).max(0) as usize;
        return format!("{x:.decimals$}");
    }
    let m = x / 10f64.powi(e);
    // Rounding the mantissa can carry into the next decade (9.9996e-5 → 10.000e-5).
    let (m, e) = if format!("{:.3}", m.abs()).starts_with("10") {
        (m / 10.0, e + 1)
    } else {
        (m, e)
    };
    format!("{m:.3}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
}

/// As few digits as say the number exactly, at most six decimals (`16`, `0.5`, `0.353553`).
pub fn short(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sci_reads_the_same_across_decades() {
        assert_eq!(sci(1.0320), "1.032");
        assert_eq!(sci(0.111), "0.1110");
        assert_eq!(sci(2.4e-5), "2.400e-05");
        assert_eq!(sci(9.99996e-5), "1.000e-04");
        assert_eq!(sci(12345.0), "1.234e+04");
        assert_eq!(sci(0.0), "0");
        assert_eq!(sci(f64::INFINITY), "inf");
        assert_eq!(short(16.0), "16");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(1.0 / 8f64.sqrt()), "0.353553");
        assert_eq!(short(-0.0000001), "0");
    }
}
