//! Host-side tensors and training batches, and their conversion to burn tensors.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::dataset::{BatchPlan, Dataset, SamplePlan};
use crate::error::{DataError, Result};
use crate::image_io::{decode_image, decode_image_with_alpha, decode_mask, write_mask, write_pixels};
use crate::scan::{ImageSource, MaskSource};

/// A dense row-major `f32` tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Elements, row-major.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
}

impl HostTensor {
    /// Wraps `data`, checking that it has `shape.iter().product()` elements.
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(DataError::Shape {
                shape,
                message: format!("expects {n} elements, got {}", data.len()),
            });
        }
        Ok(Self { data, shape })
    }

    /// Copies the tensor to `device` as a rank-`D` burn tensor.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// let t = sd_data::HostTensor::new(vec![1.0, 2.0, 3.0, 4.0], vec![1, 1, 2, 2]).unwrap();
    /// let x = t.to_tensor::<Flex, 4>(&Default::default()).unwrap();
    /// assert_eq!(x.dims(), [1, 1, 2, 2]);
    /// ```
    pub fn to_tensor<B: Backend, const D: usize>(
        &self,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        if self.shape.len() != D {
            return Err(DataError::Shape {
                shape: self.shape.clone(),
                message: format!("expected rank {D}"),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        ))
    }

    /// Copies a burn tensor to the host (converting its elements to `f32`).
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Self> {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| DataError::Shape {
                shape: shape.clone(),
                message: format!("cannot read tensor data: {e:?}"),
            })?;
        Self::new(data, shape)
    }

    /// The `i`-th slice along the first axis.
    pub fn row(&self, i: usize) -> Option<HostTensor> {
        let (&n, rest) = self.shape.split_first()?;
        if i >= n {
            return None;
        }
        let len: usize = rest.iter().product();
        Some(Self {
            data: self.data[i * len..(i + 1) * len].to_vec(),
            shape: std::iter::once(1).chain(rest.iter().copied()).collect(),
        })
    }

    /// Concatenates tensors of shape `[1, ...]` (identical trailing dims) along the first axis.
    pub fn stack_rows(rows: &[HostTensor]) -> Result<HostTensor> {
        let Some(first) = rows.first() else {
            return Err(DataError::Shape {
                shape: vec![],
                message: "cannot stack zero tensors".into(),
            });
        };
        let mut data = Vec::with_capacity(first.data.len() * rows.len());
        for r in rows {
            if r.shape.first() != Some(&1) || r.shape[1..] != first.shape[1..] {
                return Err(DataError::Shape {
                    shape: r.shape.clone(),
                    message: format!("cannot stack with {:?}", first.shape),
                });
            }
            data.extend_from_slice(&r.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = rows.len();
        Ok(Self { data, shape })
    }
}

/// What a batch carries: pixels, or VAE latents read from the cache.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchData {
    /// `[N, 3, H, W]` pixels in `[-1, 1]`.
    Pixels(HostTensor),
    /// `[N, C, h, w]` latents as produced by the [`crate::LatentEncoder`].
    Latents(HostTensor),
}

/// A training batch: images of one bucket plus per-sample captions, loss weights and the SDXL
/// size / crop conditioning.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Pixels or latents.
    pub data: BatchData,
    /// Captions after transforms.
    pub captions: Vec<String>,
    /// Loss weight per sample (regularization images may differ).
    pub loss_weights: Vec<f32>,
    /// Original image size `(height, width)` after EXIF orientation.
    pub original_sizes_hw: Vec<(u32, u32)>,
    /// Crop `(top, left)` in the resized training frame (mirrored when flipped).
    pub crop_top_lefts: Vec<(u32, u32)>,
    /// Bucket size `(height, width)`.
    pub target_sizes_hw: Vec<(u32, u32)>,
    /// Whether each sample was flipped.
    pub flipped: Vec<bool>,
    /// Index of each sample's image in [`Dataset::images`].
    pub images: Vec<usize>,
    /// Loss masks `[N, 1, h, w]` in `[0, 1]` when the dataset has any
    /// ([`Dataset::has_masks`]; samples without one are all ones, as kohya fills them): at
    /// pixel size in pixel batches, at latent size in batches from the latent cache. Bring
    /// them to the loss's size with [`crate::image_io::area_resize`].
    pub masks: Option<HostTensor>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    /// Whether the batch has no samples.
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }

    /// The pixels or latents as a burn tensor on `device`.
    pub fn to_tensor<B: Backend>(&self, device: &B::Device) -> Result<Tensor<B, 4>> {
        match &self.data {
            BatchData::Pixels(t) | BatchData::Latents(t) => t.to_tensor(device),
        }
    }

    /// The pixels, if this is a pixel batch.
    pub fn pixels(&self) -> Option<&HostTensor> {
        match &self.data {
            BatchData::Pixels(t) => Some(t),
            BatchData::Latents(_) => None,
        }
    }

    /// Sample `k`'s loss mask area-resampled to `(h, w)`, the latents' size, as a
    /// `[1, 1, h, w]` tensor (kohya brings masks to the loss's size this way); `None` when
    /// the batch has no masks.
    pub fn mask_at(&self, k: usize, (h, w): (usize, usize)) -> Option<Result<HostTensor>> {
        let masks = self.masks.as_ref()?;
        let resized = masks.row(k).and_then(|row| match row.shape.as_slice() {
            &[1, 1, src_h, src_w] => Some(crate::image_io::area_resize(&row.data, (src_h, src_w), (h, w))),
            _ => None,
        });
        Some(match resized {
            Some(plane) => HostTensor::new(plane, vec![1, 1, h, w]),
            None => Err(DataError::Shape {
                shape: masks.shape.clone(),
                message: format!("has no mask row {k} of shape [1, 1, H, W]"),
            }),
        })
    }

    /// The latents, if this is a latent batch.
    pub fn latents(&self) -> Option<&HostTensor> {
        match &self.data {
            BatchData::Latents(t) => Some(t),
            BatchData::Pixels(_) => None,
        }
    }

    pub(crate) fn from_plan(ds: &Dataset, plan: &BatchPlan, data: BatchData) -> Self {
        let s = &plan.samples;
        Self {
            data,
            captions: s.iter().map(|p| p.caption.clone()).collect(),
            loss_weights: s.iter().map(|p| p.loss_weight).collect(),
            original_sizes_hw: s
                .iter()
                .map(|p| {
                    let img = &ds.images()[p.image];
                    (img.height, img.width)
                })
                .collect(),
            crop_top_lefts: s.iter().map(|p| p.crop_top_left()).collect(),
            target_sizes_hw: s.iter().map(|p| (p.bucket.1, p.bucket.0)).collect(),
            flipped: s.iter().map(|p| p.flip).collect(),
            images: s.iter().map(|p| p.image).collect(),
            masks: None,
        }
    }
}

impl Dataset {
    /// Decodes image `i` (applying EXIF orientation); in-memory images are cloned.
    pub fn decode(&self, i: usize) -> Result<image::RgbImage> {
        Ok(self.decode_parts(i, false)?.0)
    }

    /// Image `i` and, with `with_alpha`, its alpha plane (`None`: opaque), checked against
    /// the size the scan saw.
    fn decode_parts(&self, i: usize, with_alpha: bool) -> Result<(image::RgbImage, Option<image::GrayImage>)> {
        let rec = self
            .images()
            .get(i)
            .ok_or_else(|| bad_plan(format!("image index {i} is out of range")))?;
        let (img, alpha) = match &rec.source {
            ImageSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
                match with_alpha {
                    true => decode_image_with_alpha(&bytes, path)?,
                    false => (decode_image(&bytes, path)?, None),
                }
            }
            ImageSource::Memory { image, .. } => ((**image).clone(), None),
        };
        check_size(rec, img.dimensions())?;
        Ok((img, alpha))
    }

    /// Decodes, resizes, crops, colour-changes (`color_aug`) and flips every sample of `plan`
    /// into a `[N, 3, H, W]` pixel batch, with `[N, 1, H, W]` loss masks when the dataset has any.
    pub fn load_pixels(&self, plan: &BatchPlan) -> Result<Batch> {
        let (w, h) = plan.bucket;
        let plane = w as usize * h as usize;
        let n = plan.samples.len();
        let mut data = vec![0.0f32; 3 * plane * n];
        let mut masks = self.has_masks().then(|| vec![1.0f32; plane * n]);
        for (k, (s, out)) in plan.samples.iter().zip(data.chunks_mut(3 * plane)).enumerate() {
            if s.bucket != plan.bucket {
                return Err(bad_plan(format!(
                    "sample bucket {:?} differs from the batch bucket {:?}",
                    s.bucket, plan.bucket
                )));
            }
            let mask = masks.as_mut().map(|m| &mut m[k * plane..(k + 1) * plane]);
            self.fill_sample(s, out, mask)?;
        }
        let pixels = HostTensor::new(data, vec![n, 3, h as usize, w as usize])?;
        let mut batch = Batch::from_plan(self, plan, BatchData::Pixels(pixels));
        batch.masks = match masks {
            Some(m) => Some(HostTensor::new(m, vec![n, 1, h as usize, w as usize])?),
            None => None,
        };
        Ok(batch)
    }

    /// One sample's pixels as `[1, 3, H, W]` in `[-1, 1]`.
    pub fn sample_pixels(&self, s: &SamplePlan) -> Result<HostTensor> {
        let (w, h) = s.bucket;
        let mut data = vec![0.0; 3 * w as usize * h as usize];
        self.fill_sample(s, &mut data, None)?;
        HostTensor::new(data, vec![1, 3, h as usize, w as usize])
    }

    /// One sample's loss mask as `[1, 1, H, W]` in `[0, 1]` with the sample's resize, crop
    /// and flip, or `None` when its image has no mask.
    pub fn sample_mask(&self, s: &SamplePlan) -> Result<Option<HostTensor>> {
        let rec = self
            .images()
            .get(s.image)
            .ok_or_else(|| bad_plan(format!("image index {} is out of range", s.image)))?;
        if rec.mask.is_none() {
            return Ok(None);
        }
        check_crop(s)?;
        let (w, h) = s.bucket;
        let mut data = vec![1.0; w as usize * h as usize];
        let mask = match rec.mask {
            Some(MaskSource::Alpha) => self.decode_parts(s.image, true)?.1,
            _ => self.decode_mask(s.image)?,
        };
        if let Some(mask) = mask {
            write_mask(&mask, s.resized, s.crop, s.bucket, s.flip, &mut data);
        }
        HostTensor::new(data, vec![1, 1, h as usize, w as usize]).map(Some)
    }

    fn fill_sample(&self, s: &SamplePlan, out: &mut [f32], mask_out: Option<&mut [f32]>) -> Result<()> {
        check_crop(s)?;
        let rec = self
            .images()
            .get(s.image)
            .ok_or_else(|| bad_plan(format!("image index {} is out of range", s.image)))?;
        let Some(mask_out) = mask_out else {
            write_pixels(&self.decode(s.image)?, s.resized, self.resize_interpolation(s), s.crop, s.bucket, s.flip, s.color, out);
            return Ok(());
        };
        // One decode gives the pixels and, for alpha masks, the alpha plane.
        let (img, mask) = match &rec.mask {
            Some(MaskSource::Alpha) => self.decode_parts(s.image, true)?,
            Some(MaskSource::File { .. }) => (self.decode(s.image)?, self.decode_mask(s.image)?),
            None => (self.decode(s.image)?, None),
        };
        write_pixels(&img, s.resized, self.resize_interpolation(s), s.crop, s.bucket, s.flip, s.color, out);
        // A sample without a mask (or an opaque alpha) keeps the ones it was given.
        if let Some(mask) = mask {
            write_mask(&mask, s.resized, s.crop, s.bucket, s.flip, mask_out);
        }
        Ok(())
    }

    /// Image `i`'s mask file at the image's size; `None` when its mask is not a file.
    fn decode_mask(&self, i: usize) -> Result<Option<image::GrayImage>> {
        let rec = &self.images()[i];
        match &rec.mask {
            None | Some(MaskSource::Alpha) => Ok(None),
            Some(MaskSource::File { path, .. }) => {
                let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
                let mask = decode_mask(&bytes, path)?;
                if mask.dimensions() != (rec.width, rec.height) {
                    return Err(DataError::Mask {
                        path: rec.source.display_path(),
                        message: format!(
                            "the mask {} is {}x{} px now but the image is {}x{} px",
                            path.display(),
                            mask.width(),
                            mask.height(),
                            rec.width,
                            rec.height
                        ),
                    });
                }
                Ok(Some(mask))
            }
        }
    }
}

fn check_crop(s: &SamplePlan) -> Result<()> {
    let fits = |crop: u32, bucket: u32, resized: u32| {
        bucket > 0 && crop.checked_add(bucket).is_some_and(|e| e <= resized)
    };
    if !fits(s.crop.0, s.bucket.0, s.resized.0) || !fits(s.crop.1, s.bucket.1, s.resized.1) {
        return Err(bad_plan(format!(
            "crop {:?} of bucket {:?} does not fit the resized image {:?}",
            s.crop, s.bucket, s.resized
        )));
    }
    Ok(())
}

fn check_size(rec: &crate::scan::ImageRecord, dims: (u32, u32)) -> Result<()> {
    if dims != (rec.width, rec.height) {
        return Err(DataError::CorruptImage {
            path: rec.source.display_path(),
            message: format!(
                "is {}x{} now but was {}x{} when the dataset was scanned",
                dims.0, dims.1, rec.width, rec.height
            ),
        });
    }
    Ok(())
}

fn bad_plan(message: String) -> DataError {
    DataError::Config {
        key: "sample_plan".into(),
        message,
    }
}
