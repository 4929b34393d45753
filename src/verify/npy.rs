//! A minimal `.npy` writer (format version 1.0, little-endian float32, C order), enough for
//! `numpy.load` to read the logits `verify --logits-out` writes: whole ([`write_npy`]) or row block
//! by row block ([`NpyRows`]), so that the logits of a long text never sit in memory at once.

use std::io::Write;
use std::path::Path;

use super::error::{Result, VerifyError};
use crate::output::AtomicOutput;

/// The header of an `.npy` file of float32 with shape `shape`.
fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // magic (6) + version (2) + header length (2) + header, padded with spaces and ended by '\n' so
    // the data starts on a 64-byte boundary.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

fn extend_f32(out: &mut Vec<u8>, data: &[f32]) {
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The bytes of an `.npy` file holding `data` with shape `shape`.
pub fn npy_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let mut out = npy_header(shape);
    extend_f32(&mut out, data);
    out
}

/// A 2-D `.npy` file of `rows` × `cols` written a block of rows at a time, atomically: it appears
/// under its name only when [`NpyRows::finish`] has seen every row.
pub struct NpyRows {
    out: AtomicOutput,
    path: std::path::PathBuf,
    cols: usize,
    rows_left: usize,
}

impl NpyRows {
    pub fn create(path: &Path, rows: usize, cols: usize) -> Result<NpyRows> {
        let mut out = AtomicOutput::create(path, &[]).map_err(VerifyError::Output)?;
        out.write_all(&npy_header(&[rows, cols]))
            .map_err(|error| VerifyError::Write {
                path: path.to_path_buf(),
                error,
            })?;
        Ok(NpyRows {
            out,
            path: path.to_path_buf(),
            cols,
            rows_left: rows,
        })
    }

    /// Appends whole rows (`data.len()` a multiple of the column count).
    pub fn write_rows(&mut self, data: &[f32]) -> Result<()> {
        let n = data.len() / self.cols.max(1);
        assert!(
            data.len() == n * self.cols && n <= self.rows_left,
            "NpyRows: {} values do not fit the rows left",
            data.len()
        );
        let mut bytes = Vec::new();
        extend_f32(&mut bytes, data);
        self.out
            .write_all(&bytes)
            .map_err(|error| VerifyError::Write {
                path: self.path.clone(),
                error,
            })?;
        self.rows_left -= n;
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        assert_eq!(self.rows_left, 0, "NpyRows: rows missing");
        self.out.finish().map_err(VerifyError::Output)
    }
}

/// Writes an `.npy` file atomically (temporary file beside it, renamed when complete), with the
/// usual permissions of a new file.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let write = |error| VerifyError::Write {
        path: path.to_path_buf(),
        error,
    };
    let mut out = AtomicOutput::create(path, &[]).map_err(VerifyError::Output)?;
    out.write_all(&npy_bytes(shape, data)).map_err(write)?;
    out.finish().map_err(VerifyError::Output)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_describes_the_array() {
        let b = npy_bytes(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1.0f32.to_le_bytes());
    }

    #[test]
    fn rows_written_in_blocks_equal_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let mut w = NpyRows::create(&p, 4, 3).unwrap();
        w.write_rows(&data[..3]).unwrap();
        w.write_rows(&data[3..]).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), npy_bytes(&[4, 3], &data));
    }
}
