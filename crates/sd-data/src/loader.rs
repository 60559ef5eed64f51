//! Background loading: worker threads decode (or read cached latents for) upcoming batches while
//! the accelerator trains on the current one.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::cache::LatentCache;
use crate::dataset::{BatchPlan, Dataset};
use crate::error::{DataError, Result};

/// Worker count and look-ahead of a [`Loader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderOptions {
    /// Worker threads (at least 1).
    pub workers: usize,
    /// Finished batches each worker may hold before it waits (at least 1).
    pub prefetch: usize,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 8),
            prefetch: 2,
        }
    }
}

/// An iterator over batches produced ahead of time on worker threads, in plan order.
///
/// Worker `k` of `n` loads batches `k, k + n, k + 2n, ...` into its own bounded queue and the
/// iterator reads the queues round-robin, so order is deterministic and memory is bounded by
/// `workers * prefetch` batches. Dropping the loader stops the workers.
///
/// ```
/// use std::sync::Arc;
/// use sd_data::{demo, Dataset, DatasetConfig, LoaderOptions, SubsetConfig};
/// let samples = demo::generate(&demo::DemoConfig { count: 6, ..Default::default() });
/// let ds = Arc::new(Dataset::from_memory(&DatasetConfig::demo(""), SubsetConfig::default(),
///     demo::into_memory_images(samples)).unwrap());
/// let n: usize = ds.pixel_loader(0, LoaderOptions::default()).map(|b| b.unwrap().len()).sum();
/// assert_eq!(n, 6);
/// ```
pub struct Loader {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
    failed: bool,
}

impl Loader {
    /// Runs `load` for every plan on `options.workers` threads.
    pub fn spawn<F>(plans: Vec<BatchPlan>, options: LoaderOptions, load: F) -> Self
    where
        F: Fn(&BatchPlan) -> Result<Batch> + Send + Sync + 'static,
    {
        let total = plans.len();
        let workers = options.workers.clamp(1, total.max(1));
        let plans = Arc::new(plans);
        let load = Arc::new(load);
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for k in 0..workers {
            let (tx, rx) = sync_channel(options.prefetch.max(1));
            let plans = Arc::clone(&plans);
            let load = Arc::clone(&load);
            handles.push(std::thread::spawn(move || {
                for plan in plans.iter().skip(k).step_by(workers) {
                    // A closed channel means the consumer is gone: stop quietly.
                    if tx.send(load(plan)).is_err() {
                        return;
                    }
                }
            }));
            receivers.push(rx);
        }
        Self {
            receivers,
            handles,
            next: 0,
            total,
            failed: false,
        }
    }

    /// Number of batches this loader yields.
    pub fn num_batches(&self) -> usize {
        self.total
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total || self.failed {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        match rx.recv() {
            Ok(item) => Some(item),
            Err(_) => {
                self.failed = true;
                Some(Err(DataError::Loader {
                    message: format!("worker for batch {} exited without a result", self.next - 1),
                }))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.failed {
            0
        } else {
            self.total - self.next
        };
        (left, Some(left))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queues unblocks workers waiting to send; then they can be joined.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Dataset {
    /// Loads epoch `epoch`'s pixel batches on background threads.
    pub fn pixel_loader(self: &Arc<Self>, epoch: u64, options: LoaderOptions) -> Loader {
        let ds = Arc::clone(self);
        Loader::spawn(self.plan_epoch(epoch), options, move |plan| {
            ds.load_pixels(plan)
        })
    }

    /// Loads epoch `epoch`'s batches as cached latents on background threads (run
    /// [`LatentCache::cache_dataset`] first); `encoder_identity` is the VAE's
    /// [`crate::LatentEncoder::identity`].
    pub fn latent_loader(
        self: &Arc<Self>,
        epoch: u64,
        cache: LatentCache,
        encoder_identity: String,
        options: LoaderOptions,
    ) -> Loader {
        let ds = Arc::clone(self);
        Loader::spawn(self.plan_epoch(epoch), options, move |plan| {
            cache.load_batch(&ds, plan, &encoder_identity)
        })
    }
}
