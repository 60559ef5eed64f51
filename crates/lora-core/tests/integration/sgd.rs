//! `FlatAdamW::with_sgd` against PyTorch's `torch.optim.SGD` and `bitsandbytes`' `SGD8bit`:
//! the trajectories of `xtask/fixtures/lora_core_sgd.py` replayed with the recorded
//! gradients (Nesterov, dampening, L2 weight decay, no momentum, tensors without gradients
//! in some steps, whose momentum buffers then start later).

use lora_core::optim::{AdamWSettings, SgdSettings};

use crate::common;
use common::trajectory::{replay, start, values, Fixture};

fn fixture() -> Fixture {
    common::f32_fixture("sgd.safetensors")
}

fn decay(weight_decay: f32) -> AdamWSettings {
    AdamWSettings { weight_decay, ..AdamWSettings::default() }
}

/// The settings of the fixture script's `CASES`; `bnb8bit` is bitsandbytes' SGD8bit as
/// sd-scripts makes it for `SGDNesterov8bit`, whose kernel takes plain momentum.
fn cases() -> [(&'static str, f32, SgdSettings); 4] {
    [
        ("nesterov", 0.0, SgdSettings::default()),
        ("dampened", 0.05, SgdSettings { momentum: 0.8, dampening: 0.1, nesterov: false }),
        ("plain", 0.01, SgdSettings { momentum: 0.0, dampening: 0.0, nesterov: false }),
        ("bnb8bit", 0.01, SgdSettings { momentum: 0.9, dampening: 0.0, nesterov: false }),
    ]
}

/// Each step's values match PyTorch's (and bitsandbytes') to rounding.
#[test]
fn sgd_follows_torch() {
    let f = fixture();
    for (case, weight_decay, settings) in cases() {
        let (pair, optim) = start(&f, case, decay(weight_decay));
        let mut optim = optim.with_sgd(settings).unwrap();
        assert_eq!(optim.sgd_settings(), Some(settings));
        let pair = replay(&f, case, pair, &mut optim, |step, t, worst| {
            assert!(worst <= 1e-7, "{case} step {step} {t}: max |diff| {worst:e}");
        });
        let b = values(pair.b.val().inner());
        assert!(b.iter().filter(|v| v.abs() > 1e-3).count() > b.len() / 2, "{case}: b barely moved: {b:?}");
    }
}

/// Nesterov's variant is not the heavy ball's: the same gradients give other values.
#[test]
fn nesterov_differs_from_plain_momentum() {
    let f = fixture();
    let (pair, optim) = start(&f, "nesterov", decay(0.0));
    let mut heavy = optim.with_sgd(SgdSettings { nesterov: false, ..SgdSettings::default() }).unwrap();
    let mut worst = 0f32;
    replay(&f, "nesterov", pair, &mut heavy, |_, _, w| worst = worst.max(w));
    assert!(worst > 1e-3, "{worst:e}");
}

/// PyTorch's checks: Nesterov needs a momentum and no dampening; no negative momentum or
/// weight decay.
#[test]
fn invalid_settings_are_errors() {
    let f = fixture();
    for (settings, weight_decay) in [
        (SgdSettings { momentum: 0.0, ..SgdSettings::default() }, 0.0),
        (SgdSettings { dampening: 0.1, ..SgdSettings::default() }, 0.0),
        (SgdSettings { momentum: -0.5, nesterov: false, ..SgdSettings::default() }, 0.0),
        (SgdSettings::default(), -1.0),
    ] {
        let (_, optim) = start(&f, "plain", decay(weight_decay));
        assert!(optim.with_sgd(settings).is_err(), "{settings:?}, decay {weight_decay}");
    }
}
