//! The benchmark runs both modes on the tiny UNet.

use burn::backend::{Autodiff, Flex};
use sd_model::targets::UnetTargets;
use sd_model::UnetConfig;
use trainer::bench::{run, BenchOptions};

#[test]
fn bench_times_train_and_infer_steps() {
    for train in [true, false] {
        let opts = BenchOptions {
            unet: UnetConfig::tiny(),
            batch: 1,
            resolution: 64,
            steps: 2,
            targets: UnetTargets::AttnMlp,
            train,
        };
        let (first, median) = run::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
        assert!(first > 0.0 && median > 0.0 && median.is_finite());
    }
    let bad = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 60, steps: 1, targets: UnetTargets::Attn, train: true };
    assert!(run::<Autodiff<Flex>>(&bad, &Default::default()).is_err());
}
