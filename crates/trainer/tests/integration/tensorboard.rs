//! TensorBoard event files: the bytes TensorBoard's own writer produces, and what a training
//! run (and a resumed one) logs.

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use trainer::tensorboard::EventWriter;
use trainer::TrainConfig;

type B = Autodiff<Flex>;

const T0: f64 = 1_764_547_200.25;

/// The events of `xtask/fixtures/trainer_tensorboard.py`, written by the `tensorboard`
/// Python package into `tests/fixtures/tensorboard/events.out.tfevents.golden`.
#[test]
fn writes_the_bytes_tensorboard_writes() {
    let _rng = crate::common::seeded();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.out.tfevents.test");
    let mut w = EventWriter::create_file(&path, T0).unwrap();
    w.scalars(1, T0 + 1.5, &[("loss", 0.125), ("lr/unet", 1e-4), ("grad_norm", 3.5)]).unwrap();
    w.scalars(2, T0 + 1.5, &[("loss", 0.25), ("lr/unet", 2e-4), ("grad_norm", 0.75)]).unwrap();
    w.scalars(3, T0 + 2.75, &[("loss", 0.5), ("lr/unet", 3e-4), ("grad_norm", 1.0)]).unwrap();
    w.version(T0 + 60.0).unwrap();
    w.restart(3, T0 + 60.0).unwrap();
    w.scalars(3, T0 + 61.0, &[("loss", f32::NAN), ("lr/unet", 3e-4), ("lr/text_encoder", 1.5e-4), ("loss_scale", 32768.0)]).unwrap();
    w.scalars(4, T0 + 61.0, &[("loss", 0.0625), ("lr/unet", 4e-4), ("lr/text_encoder", 2e-4), ("grad_norm", 0.0), ("loss_scale", 65536.0)])
        .unwrap();
    w.flush().unwrap();
    let ours = std::fs::read(&path).unwrap();
    let golden = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard/events.out.tfevents.golden")).unwrap();
    assert_eq!(ours.len(), golden.len());
    assert!(ours == golden, "first difference at byte {:?}", ours.iter().zip(&golden).position(|(a, b)| a != b));
    // The reader below agrees with it (and so can check the training runs).
    let events = read_events(&path);
    assert_eq!(events.len(), 8);
    assert_eq!(events[5], Event { wall_time: T0 + 60.0, step: 3, version: None, start: true, values: vec![] });
    assert_eq!(events[1].values, vec![("loss".into(), 0.125), ("lr/unet".into(), 1e-4), ("grad_norm".into(), 3.5)]);
}

#[test]
fn training_logs_every_step_and_a_resumed_run_restarts_at_its_next_step() {
    let _rng = crate::common::seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = TrainConfig::default();
    config.output.output_dir = dir.path().to_path_buf();
    config.train.max_train_steps = 5;
    config.train.lr_warmup_steps = 2;
    config.train.text_encoder_lr = 5e-4;
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    config.data.demo_images = 4;
    config.output.sample_prompts.truncate(1);
    config.output.sample_steps = 2;
    config.output.log_interval_s = 0.0;
    // Stopped after step 3 (as by Ctrl-C), then resumed to the end.
    let first = trainer::train::train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
    assert!(first.interrupted);
    let first_file = first.tensorboard.clone().expect("tensorboard is on by default");
    assert_eq!(first_file.parent().unwrap(), dir.path().join("logs"));
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let second_file = second.tensorboard.clone().unwrap();
    assert_ne!(first_file, second_file, "a resumed run writes a file of its own");

    let scalars = |events: &[Event], tag: &str| -> Vec<(u64, f32)> {
        events.iter().flat_map(|e| e.values.iter().filter(|(t, _)| t == tag).map(|(_, v)| (e.step, *v))).collect()
    };
    let one = read_events(&first_file);
    assert_eq!(one[0].version.as_deref(), Some("brain.Event:2"));
    assert!(one[1].start && one[1].step == 1, "a new run drops earlier runs' curves in the folder: {:?}", one[1]);
    let two = read_events(&second_file);
    assert_eq!(two[0].version.as_deref(), Some("brain.Event:2"));
    assert!(two[1].start && two[1].step == 4, "START at the resumed run's first step: {:?}", two[1]);
    let losses: Vec<(u64, f32)> = scalars(&one, "loss").into_iter().chain(scalars(&two, "loss")).collect();
    let expected: Vec<(u64, f32)> = (1..=5).zip(second.losses.iter().copied()).collect();
    assert_eq!(losses, expected, "the loss of every step, as the report has it");
    let lr: Vec<(u64, f32)> = scalars(&one, "lr/unet").into_iter().chain(scalars(&two, "lr/unet")).collect();
    let expected: Vec<(u64, f32)> = (0..5).map(|s| (s as u64 + 1, trainer::train::learning_rate(&config.train, s) as f32)).collect();
    assert_eq!(lr, expected);
    let te_lr = scalars(&two, "lr/text_encoder");
    assert_eq!(te_lr.len(), 2);
    assert!((te_lr[1].1 / lr[4].1 - 0.5).abs() < 1e-6, "text_encoder_lr / learning_rate: {te_lr:?} {lr:?}");
    assert_eq!(scalars(&two, "grad_norm").len(), 2);
    assert!(scalars(&two, "loss_scale").is_empty(), "f32 runs have no loss scale");

    // Off: no logs folder.
    let off_dir = tempfile::tempdir().unwrap();
    let mut off = config.clone();
    off.output.output_dir = off_dir.path().to_path_buf();
    off.output.tensorboard = false;
    off.train.max_train_steps = 1;
    let report = trainer::train::train::<B>(&off, &Default::default(), &mut |_| true).unwrap();
    assert!(report.tensorboard.is_none() && !off_dir.path().join("logs").exists());
}

/// One decoded `tensorflow.Event` (the fields the trainer writes).
#[derive(Debug, PartialEq)]
struct Event {
    wall_time: f64,
    step: u64,
    version: Option<String>,
    start: bool,
    values: Vec<(String, f32)>,
}

/// Reads an event file, checking each record's framing and checksums.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let masked = |b: &[u8]| crc32c::crc32c(b).rotate_right(15).wrapping_add(0xa282_ead8);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut events = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(u32_at(at + 8), masked(&bytes[at..at + 8]), "length CRC of the record at {at}");
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(u32_at(at + 12 + len), masked(data), "data CRC of the record at {at}");
        events.push(decode_event(data));
        at += 16 + len;
    }
    events
}

fn decode_event(data: &[u8]) -> Event {
    let mut event = Event { wall_time: 0.0, step: 0, version: None, start: false, values: vec![] };
    for (field, value) in fields(data) {
        match (field, value) {
            (1, Field::Fixed64(v)) => event.wall_time = f64::from_bits(v),
            (2, Field::Varint(v)) => event.step = v,
            (3, Field::Bytes(b)) => event.version = Some(String::from_utf8(b.to_vec()).unwrap()),
            (5, Field::Bytes(summary)) => {
                for (_, value) in fields(summary) {
                    let Field::Bytes(value) = value else { panic!("Summary.value is a message") };
                    let (mut tag, mut simple) = (String::new(), None);
                    for (f, v) in fields(value) {
                        match (f, v) {
                            (1, Field::Bytes(t)) => tag = String::from_utf8(t.to_vec()).unwrap(),
                            (2, Field::Fixed32(x)) => simple = Some(f32::from_bits(x)),
                            other => panic!("unexpected Summary.Value field {other:?}"),
                        }
                    }
                    event.values.push((tag, simple.expect("simple_value")));
                }
            }
            (7, Field::Bytes(log)) => event.start = fields(log).iter().any(|(f, v)| *f == 1 && *v == Field::Varint(1)),
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    event
}

#[derive(Debug, PartialEq)]
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The fields of a protobuf message, in order.
fn fields(mut data: &[u8]) -> Vec<(u32, Field<'_>)> {
    fn varint(data: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = data[0];
            *data = &data[1..];
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
        }
        value
    }
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data);
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut data)),
            1 => {
                let v = u64::from_le_bytes(data[..8].try_into().unwrap());
                data = &data[8..];
                Field::Fixed64(v)
            }
            2 => {
                let len = varint(&mut data) as usize;
                let (b, rest) = data.split_at(len);
                data = rest;
                Field::Bytes(b)
            }
            5 => {
                let v = u32::from_le_bytes(data[..4].try_into().unwrap());
                data = &data[4..];
                Field::Fixed32(v)
            }
            wire => panic!("wire type {wire}"),
        };
        out.push((field, value));
    }
    out
}
