//! Seeded caption transforms: prefix and suffix, trigger word, keep_tokens and
//! keep_tokens_separator, shuffle, tag dropout, caption dropout.

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sd_data::{CaptionTransform, SubsetConfig};

fn subset(f: impl FnOnce(&mut SubsetConfig)) -> SubsetConfig {
    let mut s = SubsetConfig::default();
    f(&mut s);
    s
}

fn sorted(v: Vec<&str>) -> Vec<&str> {
    let mut v = v;
    v.sort_unstable();
    v
}

#[test]
fn no_transform_keeps_caption() {
    let s = SubsetConfig::default();
    let t = CaptionTransform::from_subset(&s);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(
        t.apply("  a photo of sks,  dog ", &mut rng),
        "a photo of sks,  dog"
    );
    assert!(t.is_fixed());
}

#[test]
fn prefix_suffix_and_keep_tokens_separator_as_kohya() {
    // kohya: prefix + " " + caption + " " + suffix, before anything else.
    let framed = subset(|s| (s.caption_prefix, s.caption_suffix) = (Some("sks style,".into()), Some(", masterpiece".into())));
    let t = CaptionTransform::from_subset(&framed);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(t.apply("a dog, grass", &mut rng), "sks style, a dog, grass , masterpiece");
    // Tags before `|||` stay first, tags after a second `|||` stay last; only those between move.
    let sep = subset(|s| {
        s.keep_tokens_separator = Some("|||".into());
        s.shuffle_caption = true;
        s.keep_tokens = 5; // ignored for captions with the separator
    });
    let t = CaptionTransform::from_subset(&sep);
    let caption = "sks, 1girl ||| red, green, blue, yellow, cyan ||| best quality, detailed";
    let mut seen = std::collections::HashSet::new();
    for seed in 0..20 {
        let out = t.apply(caption, &mut ChaCha8Rng::seed_from_u64(seed));
        let tags: Vec<&str> = out.split(", ").collect();
        assert_eq!(&tags[..2], ["sks", "1girl"], "{out}");
        assert_eq!(&tags[7..], ["best quality", "detailed"], "{out}");
        assert_eq!(sorted(tags[2..7].to_vec()), ["blue", "cyan", "green", "red", "yellow"]);
        seen.insert(out);
    }
    assert!(seen.len() > 5, "the middle tags are shuffled");
    // Without the separator in a caption, keep_tokens applies; without shuffling the
    // separator is still removed (kohya would pass it to the text encoder).
    let out = t.apply("a, b, c, d, e, f, g", &mut ChaCha8Rng::seed_from_u64(1));
    assert!(out.starts_with("a, b, c, d, e, "), "{out}");
    let plain = subset(|s| s.keep_tokens_separator = Some("|||".into()));
    let t = CaptionTransform::from_subset(&plain);
    assert!(t.is_fixed());
    assert_eq!(t.fixed("sks ||| red, blue ||| best"), "sks, red, blue, best");
    assert_eq!(t.apply("sks ||| red, blue", &mut rng), "sks, red, blue");
    // Further separators are dropped as well.
    assert_eq!(t.fixed("a ||| b ||| c ||| d"), "a, b, c, d");
}

#[test]
fn trigger_word_is_prefixed_once() {
    let s = subset(|s| s.trigger_word = Some("sks".into()));
    let t = CaptionTransform::from_subset(&s);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(t.apply("dog,  running", &mut rng), "sks, dog, running");
    assert_eq!(t.apply("sks, dog", &mut rng), "sks, dog");
    assert_eq!(t.apply("", &mut rng), "sks");
    // With keep_tokens = 1 the trigger word stays first through shuffling.
    let s = subset(|s| {
        s.trigger_word = Some("sks".into());
        s.shuffle_caption = true;
        s.keep_tokens = 1;
    });
    let t = CaptionTransform::from_subset(&s);
    for seed in 0..20 {
        let out = t.apply("a, b, c, d, e", &mut ChaCha8Rng::seed_from_u64(seed));
        assert!(out.starts_with("sks, "), "{out}");
    }
}

#[test]
fn custom_separator() {
    let s = subset(|s| {
        s.caption_separator = "|".into();
        s.shuffle_caption = true;
        s.keep_tokens = 2;
    });
    let t = CaptionTransform::from_subset(&s);
    let out = t.apply(
        "one | two|three | four, with comma",
        &mut ChaCha8Rng::seed_from_u64(3),
    );
    // Split on "|" and joined with ", " as sd-scripts joins them (whatever the separator).
    assert!(out.starts_with("one, two, "), "{out}");
    let rest = &out["one, two, ".len()..];
    assert!(rest == "three, four, with comma" || rest == "four, with comma, three", "{out}");
}

#[test]
fn shuffle_is_seeded_and_varies() {
    let s = subset(|s| s.shuffle_caption = true);
    let t = CaptionTransform::from_subset(&s);
    let caption = "a, b, c, d, e, f, g, h";
    let run = |seed| t.apply(caption, &mut ChaCha8Rng::seed_from_u64(seed));
    assert_eq!(run(5), run(5));
    let distinct: std::collections::HashSet<String> = (0..20).map(run).collect();
    assert!(
        distinct.len() > 10,
        "only {} distinct orders",
        distinct.len()
    );
}

#[test]
fn dropout_rates_are_respected() {
    let s = subset(|s| s.caption_dropout_rate = 0.25);
    let t = CaptionTransform::from_subset(&s);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 4000;
    let empty = (0..n)
        .filter(|_| t.apply("a, b", &mut rng).is_empty())
        .count();
    let p = empty as f64 / n as f64;
    assert!((p - 0.25).abs() < 0.03, "caption dropout {p}");
    assert!(!t.is_fixed());

    let s = subset(|s| {
        s.caption_tag_dropout_rate = 0.3;
        s.keep_tokens = 2;
    });
    let t = CaptionTransform::from_subset(&s);
    let caption = "k1, k2, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10";
    let mut kept = 0;
    for _ in 0..500 {
        let out = t.apply(caption, &mut rng);
        let tags: Vec<&str> = out.split(", ").collect();
        assert_eq!(&tags[..2], ["k1", "k2"]);
        // Unshuffled: survivors keep their order.
        let idx: Vec<usize> = tags[2..].iter().map(|t| t[1..].parse().unwrap()).collect();
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        kept += tags.len() - 2;
    }
    let p_keep = kept as f64 / (500.0 * 10.0);
    assert!((p_keep - 0.7).abs() < 0.03, "tag keep rate {p_keep}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Shuffling permutes the non-kept tags and leaves the first `keep_tokens` in place.
    #[test]
    fn shuffle_is_a_permutation(tags in prop::collection::vec("[a-z]{1,6}", 0..12), keep in 0usize..5, seed: u64) {
        let s = subset(|s| { s.shuffle_caption = true; s.keep_tokens = keep; });
        let t = CaptionTransform::from_subset(&s);
        let caption = tags.join(", ");
        let out = t.apply(&caption, &mut ChaCha8Rng::seed_from_u64(seed));
        let out_tags: Vec<&str> = if out.is_empty() { vec![] } else { out.split(", ").collect() };
        let k = keep.min(tags.len());
        let head: Vec<&str> = tags[..k].iter().map(String::as_str).collect();
        prop_assert_eq!(&out_tags[..k], &head[..]);
        let rest: Vec<&str> = tags[k..].iter().map(String::as_str).collect();
        prop_assert_eq!(sorted(out_tags[k..].to_vec()), sorted(rest));
    }

    /// Tag dropout only removes tags: the output is a subsequence containing all kept tokens.
    #[test]
    fn tag_dropout_yields_subsequence(tags in prop::collection::vec("[a-z]{1,6}", 1..12), keep in 0usize..4, rate in 0.0f32..1.0, seed: u64) {
        let s = subset(|s| { s.caption_tag_dropout_rate = rate; s.keep_tokens = keep; });
        let t = CaptionTransform::from_subset(&s);
        let out = t.apply(&tags.join(", "), &mut ChaCha8Rng::seed_from_u64(seed));
        let out_tags: Vec<&str> = if out.is_empty() { vec![] } else { out.split(", ").collect() };
        let mut it = tags.iter();
        for o in &out_tags {
            prop_assert!(it.any(|t| t == o), "{} not in order", o);
        }
        prop_assert!(out_tags.len() >= keep.min(tags.len()));
    }
}

/// Pieces that captions and their options are made of: the separators kohya's options
/// use, wildcard braces, new lines, multi-byte characters, and plain words.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![",", ", ", "|||", ";;;", "{", "}", "{{", "}}", "|", "\n", " ", "é", "日本", "🙂", "sks", "a b"]).prop_map(String::from),
        "\\PC{0,4}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..12).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any caption under any mix of the options (separators and markers made of the same
    /// pieces, multi-byte text, unbalanced wildcard braces) transforms without a panic, and
    /// with nothing random asked for, `apply` gives the fixed caption at every step.
    #[test]
    fn any_caption_under_any_options_transforms(
        caption in text(),
        separator in prop::sample::select(vec![",", ";", "|", " ", ",,"]),
        keep in 0usize..4,
        (shuffle, wildcard, warmup) in (any::<bool>(), any::<bool>(), any::<bool>()),
        (tag_rate, drop_rate) in (prop::sample::select(vec![0.0f32, 0.5, 1.0]), prop::sample::select(vec![0.0f32, 0.5, 1.0])),
        (prefix, suffix, trigger, marker, secondary) in (prop::option::of(text()), prop::option::of(text()), prop::option::of(text()), prop::option::of(piece()), prop::option::of(piece())),
        seed: u64,
        step in 0u64..20,
    ) {
        let s = subset(|s| {
            s.caption_separator = separator.into();
            s.keep_tokens = keep;
            s.shuffle_caption = shuffle;
            s.enable_wildcard = wildcard;
            (s.token_warmup_min, s.token_warmup_step) = if warmup { (1, 10.0) } else { (1, 0.0) };
            (s.caption_tag_dropout_rate, s.caption_dropout_rate) = (tag_rate, drop_rate);
            (s.caption_prefix, s.caption_suffix, s.trigger_word) = (prefix, suffix, trigger);
            (s.keep_tokens_separator, s.secondary_separator) = (marker, secondary);
        });
        let t = CaptionTransform::from_subset(&s);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out = t.apply_at(&caption, step, &mut rng);
        let _ = t.tags(&caption);
        if t.is_fixed() {
            prop_assert_eq!(out, t.fixed(&caption));
        }
    }
}

/// kohya's token warmup: before its last step a caption keeps its first movable tags
/// (after `keep_tokens` or the `keep_tokens_separator`'s first part, and before the last),
/// `token_warmup_min` at step 0 and `floor(step · (n − min) / steps) + min` later, cut
/// before the shuffle and the tag dropout; all of them from the last step on.
#[test]
fn token_warmup_keeps_the_first_tags_as_kohya() {
    let warm = subset(|s| (s.keep_tokens, s.token_warmup_min, s.token_warmup_step, s.shuffle_caption) = (1, 2, 6.0, true));
    let t = CaptionTransform::from_subset(&warm);
    assert!(!t.is_fixed() && !warm.captions_are_fixed());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let caption = "sks, a, b, c, d, e, f";
    // n = 6 movable tags: 2 at step 0, floor(3 · 4 / 6) + 2 = 4 at step 3, 5 at step 5.
    for (step, kept) in [(0, 2), (1, 2), (3, 4), (5, 5), (6, 6), (100, 6)] {
        for _ in 0..10 {
            let out = t.apply_at(caption, step, &mut rng);
            let tags: Vec<&str> = out.split(", ").collect();
            assert_eq!(tags[0], "sks", "{out}");
            assert_eq!(sorted(tags[1..].to_vec()), ["a", "b", "c", "d", "e", "f"][..kept].to_vec(), "step {step}: {out}");
        }
    }
    // Past the warmup, as `apply`; the kept parts of a separator stay whole.
    let sep = subset(|s| (s.keep_tokens_separator, s.token_warmup_step) = (Some("|||".into()), 4.0));
    let t = CaptionTransform::from_subset(&sep);
    assert_eq!(t.apply_at("sks, x ||| a, b, c ||| best, hq", 0, &mut rng), "sks, x, a, best, hq");
    assert_eq!(t.apply_at("sks, x ||| a, b, c ||| best, hq", 4, &mut rng), "sks, x, a, b, c, best, hq");
    assert_eq!(t.apply("sks, x ||| a, b, c ||| best, hq", &mut rng), "sks, x, a, b, c, best, hq");
    // More kept than a caption has: all of them (sd-scripts' slice).
    let many = subset(|s| (s.token_warmup_min, s.token_warmup_step) = (5, 3.0));
    assert_eq!(CaptionTransform::from_subset(&many).apply_at("a, b", 1, &mut rng), "a, b");
}
