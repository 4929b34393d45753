//! Aligned plain-text tables for human output: columns padded to their widest cell, numbers
//! right-aligned, two spaces between columns.

use std::fmt::Write;

pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers (all empty: no header line); a header starting with `>` is right-aligned (the `>` is
    /// not printed).
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with `indent` spaces before each line.
    pub fn render(&self, indent: usize) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let show_header = self.header.iter().any(|h| !h.is_empty());
        let header_row = show_header.then_some(&header);
        for row in header_row.into_iter().chain(&self.rows) {
            let mut line = " ".repeat(indent);
            for (i, cell) in row.iter().enumerate() {
                let w = widths[i];
                let last = i + 1 == row.len();
                if self.right[i] {
                    let _ = write!(line, "{cell:>w$}");
                } else if last {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}");
                }
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Bytes in MiB with one decimal (`253.4 MiB`), whatever the size: the merge and quantize summaries.
pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// A ratio or relative error with three decimals (`0.931`).
pub fn fixed3(x: f64) -> String {
    format!("{x:.3}")
}

/// A scale or alpha: as few digits as say it exactly, at most 6 decimals.
pub fn short(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Bytes in binary units (`253.4 MiB`), exact below 1 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["name", ">bytes", "note"]);
        t.row(vec!["a".into(), "1".into(), "x".into()]);
        t.row(vec!["long_name".into(), "1000".into(), "".into()]);
        assert_eq!(
            t.render(0),
            "name       bytes  note\na              1  x\nlong_name   1000\n"
        );
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
