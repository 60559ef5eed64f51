//! Dense copies of strided views on the CPU backend, in runs instead of element by element.
//!
//! burn-flex makes a strided view contiguous (before its attention op, or for a `reshape`
//! of a transposed view) with a tiled copy where the view's dimensions merge into two, and
//! otherwise through its strided iterator, one element at a time with an index update per
//! element. Attention's head split (`[b, s, h, d]` rows viewed as `[b, h, s, d]` heads)
//! and merge are of the second kind, yet each head's `d` values lie next to each other:
//! copied as runs of the innermost dimension they cost a few memory copies.

use burn::tensor::{Bytes, DType};
use burn_flex::{FlexTensor, Layout};

/// `t` as a contiguous tensor when it is a strided view whose innermost dimension is
/// contiguous (stride 1) or whose last two dimensions are transposed (the second to last
/// has stride 1); `None` for a tensor that is contiguous already, for negative strides
/// and for dtypes other than f32, f64, f16 and bf16 (burn-flex's own copy covers those).
pub(super) fn dense(t: &FlexTensor) -> Option<FlexTensor> {
    let layout = t.layout();
    if layout.is_contiguous() && layout.start_offset() == 0 {
        return None;
    }
    let shape: Vec<usize> = layout.shape().iter().copied().collect();
    let strides: Vec<usize> = layout.strides().iter().map(|&s| usize::try_from(s).ok()).collect::<Option<_>>()?;
    let rank = shape.len();
    if rank < 2 || shape.contains(&0) {
        return None;
    }
    let plan = if strides[rank - 1] == 1 {
        Plan::Runs
    } else if strides[rank - 2] == 1 {
        Plan::Transposed
    } else {
        return None;
    };
    let view = View { shape: &shape, strides: &strides, offset: layout.start_offset(), plan };
    let bytes = match t.dtype() {
        DType::F32 => Bytes::from_elems(view.copy(t.storage::<f32>())),
        DType::F64 => Bytes::from_elems(view.copy(t.storage::<f64>())),
        DType::F16 => Bytes::from_elems(view.copy(t.storage::<burn::tensor::f16>())),
        DType::BF16 => Bytes::from_elems(view.copy(t.storage::<burn::tensor::bf16>())),
        _ => return None,
    };
    Some(FlexTensor::new(bytes, Layout::contiguous(layout.shape().clone()), t.dtype()))
}

/// How the innermost block of a view is read.
#[derive(Clone, Copy)]
enum Plan {
    /// Rows of the last dimension are contiguous: one slice copy per row.
    Runs,
    /// The last two dimensions are a transposed matrix: copied in square tiles.
    Transposed,
}

/// A strided view's geometry (strides in elements, all non-negative).
struct View<'a> {
    shape: &'a [usize],
    strides: &'a [usize],
    offset: usize,
    plan: Plan,
}

/// Side of the square tiles of a transposed copy: 32 × 32 f32 values, 4 KiB read in 32 lines.
const TILE: usize = 32;

impl View<'_> {
    /// The view's values in row-major order.
    fn copy<E: Copy>(&self, src: &[E]) -> Vec<E> {
        let rank = self.shape.len();
        let (rows, cols) = (self.shape[rank - 2], self.shape[rank - 1]);
        let (row_stride, col_stride) = (self.strides[rank - 2], self.strides[rank - 1]);
        let outer = &self.shape[..rank - 2];
        let mut out = Vec::with_capacity(self.shape.iter().product());
        // An odometer over the dimensions before the last two.
        let mut index = vec![0usize; outer.len()];
        loop {
            let base = self.offset + index.iter().zip(self.strides).map(|(i, s)| i * s).sum::<usize>();
            match self.plan {
                Plan::Runs => {
                    for r in 0..rows {
                        let start = base + r * row_stride;
                        out.extend_from_slice(&src[start..start + cols]);
                    }
                }
                Plan::Transposed => transpose_into(&mut out, src, base, rows, cols, col_stride),
            }
            if !advance(&mut index, outer) {
                return out;
            }
        }
    }
}

/// Appends the `rows × cols` matrix whose element `(r, c)` is `src[base + r + c·col_stride]`
/// in row-major order, tile by tile so that reads and writes stay in cache.
fn transpose_into<E: Copy>(out: &mut Vec<E>, src: &[E], base: usize, rows: usize, cols: usize, col_stride: usize) {
    let start = out.len();
    // Filled tile by tile below; every element is written once.
    out.resize(start + rows * cols, src[base]);
    let dst = &mut out[start..];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                let column = base + c * col_stride;
                for r in r0..(r0 + TILE).min(rows) {
                    dst[r * cols + c] = src[column + r];
                }
            }
        }
    }
}

/// Steps a row-major multi-index over `shape`; false once it has wrapped around.
fn advance(index: &mut [usize], shape: &[usize]) -> bool {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < shape[d] {
            return true;
        }
        index[d] = 0;
    }
    false
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{DType, Int, Tensor};
    use proptest::prelude::*;

    use crate::kernels::dense;
    use crate::precision::cast_to;

    /// A `[a, b, c, d]` tensor of distinct values, permuted by `axes` and narrowed to
    /// `start..` in its last dimension, in `dtype`.
    fn view(dims: [usize; 4], axes: [usize; 4], start: usize, dtype: DType) -> Tensor<Flex, 4> {
        let n = dims.iter().product::<usize>() as i64;
        let t = Tensor::<Flex, 1, Int>::arange(0..n, &Default::default()).float().reshape(dims);
        let t = cast_to(t, dtype).permute(axes);
        let last = t.dims()[3];
        t.narrow(3, start.min(last - 1), last - start.min(last - 1))
    }

    proptest! {
        /// Every layout (runs, transposed, or left to burn-flex) gives the view's values in
        /// order, in every float dtype.
        #[test]
        fn dense_copies_equal_the_views(
            dims in prop::array::uniform4(1usize..6),
            axes in Just([0usize, 1, 2, 3]).prop_shuffle(),
            start in 0usize..3,
            dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::F16, DType::BF16]),
        ) {
            let axes: [usize; 4] = axes;
            let t = view(dims, axes, start, dtype);
            let copy = dense(t.clone());
            prop_assert_eq!(copy.dims(), t.dims());
            prop_assert_eq!(copy.dtype(), t.dtype());
            let expected = cast_to(t, DType::F32).into_data().to_vec::<f32>().unwrap();
            let got = cast_to(copy, DType::F32).into_data().to_vec::<f32>().unwrap();
            prop_assert_eq!(got, expected);
        }
    }

    /// The head split and merge of attention on rows: innermost runs, then a transposed
    /// last pair (a channel-last map back to channels), each read densely.
    #[test]
    fn attention_layouts_take_the_fast_copies() {
        let device = Default::default();
        let rows = Tensor::<Flex, 1, Int>::arange(0..2 * 5 * 3 * 4, &device).float().reshape([2, 5, 3, 4]);
        let heads = rows.swap_dims(1, 2);
        let flex = heads.clone().into_primitive().tensor();
        assert!(super::dense(&flex).is_some(), "runs of the head dimension");
        let map = Tensor::<Flex, 1, Int>::arange(0..2 * 6 * 7, &device).float().reshape([2, 6, 7]).swap_dims(1, 2);
        assert!(super::dense(&map.clone().into_primitive().tensor()).is_some(), "a transposed pair");
        assert_eq!(dense(map.clone()).into_data(), map.into_data());
        // Dense already: nothing to copy.
        let plain = Tensor::<Flex, 2>::zeros([3, 4], &device);
        assert!(super::dense(&plain.into_primitive().tensor()).is_none());
    }
}
