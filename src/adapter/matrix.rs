//! A dense row-major f32 matrix: what a factor becomes once read.

use std::ops::Range;

/// A dense row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix over `data`; `None` when the length is not `rows × cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<Matrix> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Matrix { rows, cols, data })
    }

    pub fn zeros(rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transposed(&self) -> Matrix {
        let mut data = Vec::with_capacity(self.data.len());
        for c in 0..self.cols {
            for r in 0..self.rows {
                data.push(self.data[r * self.cols + c]);
            }
        }
        Matrix {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }

    /// The rows in `range` as a new matrix.
    pub fn rows_range(&self, range: Range<usize>) -> Matrix {
        Matrix {
            rows: range.len(),
            cols: self.cols,
            data: self.data[range.start * self.cols..range.end * self.cols].to_vec(),
        }
    }

    pub fn scale_in_place(&mut self, factor: f32) {
        self.data.iter_mut().for_each(|v| *v *= factor);
    }

    /// Index of the first NaN or ±Inf value.
    pub fn first_non_finite(&self) -> Option<usize> {
        self.data.iter().position(|v| !v.is_finite())
    }

    /// `self · other` in f32 (f64 accumulation); for tests and small checks, not a BLAS.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows);
        let mut out = Matrix::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for j in 0..other.cols {
                let mut acc = 0f64;
                for k in 0..self.cols {
                    acc +=
                        self.data[i * self.cols + k] as f64 * other.data[k * other.cols + j] as f64;
                }
                out.data[i * other.cols + j] = acc as f32;
            }
        }
        out
    }
}
