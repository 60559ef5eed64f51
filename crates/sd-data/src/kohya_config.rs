//! kohya sd-scripts' dataset config files (`--dataset_config`, TOML).

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{DatasetConfig, SubsetConfig};
use crate::error::{DataError, Result};

/// sd-scripts options this crate does not implement, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("network_multiplier", "per-dataset network multipliers are not supported"),
    ("debug_dataset", "there is no dataset debugging mode"),
    ("validation_split", "set the trainer's data.validation_split instead"),
    ("validation_seed", "the validation split is seeded by the training seed"),
    ("max_token_length", "set the trainer's model.max_token_length instead"),
];

/// sd-scripts options that change only its speed, which are read and left alone
/// (`cache_info` caches its scan of image sizes; this crate reads them anew each time).
const SPEED_ONLY: &[&str] = &["cache_info"];

/// Where in the file a table is, for messages.
#[derive(Clone, Copy)]
enum Section {
    General,
    Dataset(usize),
    Subset(usize, usize),
}

impl Section {
    fn key(self, key: &str) -> String {
        match self {
            Self::General => format!("general.{key}"),
            Self::Dataset(i) => format!("datasets[{i}].{key}"),
            Self::Subset(i, j) => format!("datasets[{i}].subsets[{j}].{key}"),
        }
    }
}

/// The field names of a serialised struct.
fn field_names(value: &Value) -> Vec<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

impl DatasetConfig {
    /// Reads sd-scripts' dataset config from the TOML file `path` ([`from_kohya_toml`](Self::from_kohya_toml)).
    pub fn from_kohya_toml_file(path: &Path, defaults: &DatasetConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::from_kohya_toml(&text, path, defaults)
    }

    /// Reads sd-scripts' dataset config `text` (from `path`, for messages). Values the file
    /// leaves out come from `defaults`: its dataset options, and for the subsets its first
    /// subset's options (or [`SubsetConfig::default`]) but the folder, which every subset
    /// must name (`image_dir`). The result is validated.
    ///
    /// kohya sd-scripts' dataset config files (`--dataset_config`, TOML): `[general]` options
    /// for everything, `[[datasets]]` with their options, and each dataset's
    /// `[[datasets.subsets]]` (image folders).
    ///
    /// As in sd-scripts, a subset's value wins over its dataset's, which wins over
    /// `[general]`'s, which wins over the defaults the caller gives (sd-scripts takes them from
    /// its command line). The datasets must agree on the dataset options (resolution,
    /// buckets, batch size): they become one [`DatasetConfig`] with all their subsets.
    /// Fine-tuning subsets (`metadata_file`) are read as [`SubsetConfig::metadata_file`].
    /// `custom_attributes = { diff_output_preservation = true }` sets
    /// [`SubsetConfig::diff_output_preservation`]. Options sd-scripts has and this crate
    /// does not (`network_multiplier`, ...) are errors naming the option.
    ///
    /// ```
    /// use sd_data::DatasetConfig;
    /// let toml = r#"
    /// [general]
    /// shuffle_caption = true
    /// caption_extension = ".txt"
    /// keep_tokens = 1
    ///
    /// [[datasets]]
    /// resolution = 768
    /// batch_size = 2
    ///
    ///   [[datasets.subsets]]
    ///   image_dir = "img/style"
    ///   num_repeats = 10
    ///
    ///   [[datasets.subsets]]
    ///   image_dir = "img/reg"
    ///   is_reg = true
    ///   keep_tokens = 0
    /// "#;
    /// let config = DatasetConfig::from_kohya_toml(toml, "dataset.toml".as_ref(), &DatasetConfig::default()).unwrap();
    /// assert_eq!((config.resolution.width, config.batch_size), (768, 2));
    /// assert_eq!(config.subsets[0].num_repeats, Some(10));
    /// assert!(config.subsets[0].shuffle_caption && config.subsets[1].is_reg);
    /// assert_eq!((config.subsets[0].keep_tokens, config.subsets[1].keep_tokens), (1, 0));
    /// ```
    pub fn from_kohya_toml(text: &str, path: &Path, defaults: &DatasetConfig) -> Result<Self> {
        // Errors name the file, and the key as the file spells its place.
        read_kohya_toml(text, path, defaults).map_err(|e| match e {
            DataError::Config { key, message } => DataError::ConfigFile { path: path.to_path_buf(), message: format!("`{key}` {message}") },
            other => other,
        })
    }
}

/// The first float of `table` that is NaN or infinite, with its dotted key path
/// (`datasets[0].subsets[1].loss_weight`).
fn non_finite(table: &toml::Table, prefix: &str) -> Option<(String, f64)> {
    table.iter().find_map(|(k, v)| non_finite_value(v, &format!("{prefix}{}{k}", if prefix.is_empty() { "" } else { "." })))
}

fn non_finite_value(value: &toml::Value, key: &str) -> Option<(String, f64)> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
        toml::Value::Table(t) => non_finite(t, key),
        toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| non_finite_value(v, &format!("{key}[{i}]"))),
        _ => None,
    }
}

fn read_kohya_toml(text: &str, path: &Path, defaults: &DatasetConfig) -> Result<DatasetConfig> {
    let file_error = |message: String| DataError::ConfigFile { path: path.to_path_buf(), message };
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| file_error(e.to_string()))?;
    // JSON has no NaN or infinity: converted, they would become nulls, which read as a
    // key left out (its default) or as a type error about a `null` nobody wrote.
    if let Some((key, v)) = non_finite(&doc, "") {
        return Err(file_error(format!("`{key}` = {v}: must be a finite number")));
    }
    let doc = serde_json::to_value(doc).map_err(|e| file_error(e.to_string()))?;
    let doc = doc.as_object().cloned().unwrap_or_default();
    if let Some(key) = doc.keys().find(|k| *k != "general" && *k != "datasets") {
        return Err(file_error(format!("unknown top-level key `{key}` (expected [general] and [[datasets]])")));
    }
    let general = table(&doc, "general", path)?.unwrap_or_default();
    let datasets = match doc.get("datasets") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => return Err(file_error("list the data in [[datasets]] with their [[datasets.subsets]]".into())),
    };

    let to_value = |v: serde_json::Result<Value>| v.map_err(|e| file_error(e.to_string()));
    let mut dataset_defaults = to_value(serde_json::to_value(DatasetConfig { subsets: Vec::new(), ..defaults.clone() }))?;
    // sd-scripts reads a subset's folder as it is: its own images (not its sub-folders), no
    // repeats or class tokens from its name (so `num_repeats` is 1 unless given).
    let template = SubsetConfig {
        recursive: false,
        folder_names: false,
        ..defaults.subsets.first().cloned().unwrap_or_default()
    };
    let typing_defaults = to_value(serde_json::to_value(&template))?;
    let mut subset_defaults = typing_defaults.clone();
    let (dataset_keys, subset_keys) = {
        let mut d = field_names(&dataset_defaults);
        d.retain(|k| k != "subsets");
        (d, field_names(&subset_defaults))
    };
    if let (Some(d), Some(s)) = (dataset_defaults.as_object_mut(), subset_defaults.as_object_mut()) {
        d.remove("subsets");
        s.remove("image_dir");
        // A fine-tuning subset is one that names its file.
        s.remove("metadata_file");
    }
    // A value's type is checked where the file sets it, so that an error names that place
    // (`general.keep_tokens`), not the subset the value reaches.
    let check_type = |section: Section, key: &str, value: &Value, in_dataset: bool| -> Result<()> {
        let mut alone = if in_dataset { dataset_defaults.clone() } else { typing_defaults.clone() };
        if let Some(obj) = alone.as_object_mut() {
            obj.insert(key.to_string(), value.clone());
        }
        let typed = if in_dataset { serde_json::from_value::<DatasetConfig>(alone).map(drop) } else { serde_json::from_value::<SubsetConfig>(alone).map(drop) };
        typed.map_err(|err| DataError::config(&section.key(key), format!("has the wrong type: {err}")))
    };
    let route = |section: Section, table: &Map<String, Value>, dataset: &mut Value, subset: &mut Value| -> Result<()> {
        if table.contains_key("conditioning_data_dir") && table.contains_key("mask_dir") {
            return Err(DataError::config(&section.key("conditioning_data_dir"), "and `mask_dir` both name the mask folder: set one"));
        }
        for (written, value) in table {
            let key = if written == "conditioning_data_dir" { "mask_dir" } else { written.as_str() };
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
                return Err(DataError::config(&section.key(key), format!("(sd-scripts' option) is not supported: {why}")));
            }
            if SPEED_ONLY.contains(&key) {
                continue;
            }
            if key == "custom_attributes" {
                let preserve = custom_attributes(section, value)?;
                if let Some(obj) = subset.as_object_mut() {
                    obj.insert("diff_output_preservation".into(), Value::Bool(preserve));
                }
                continue;
            }
            let in_dataset = dataset_keys.iter().any(|k| k == key);
            let target = if in_dataset {
                if let Section::Subset(..) = section {
                    return Err(DataError::config(&section.key(key), "is a dataset option: set it in its [[datasets]] entry or in [general]"));
                }
                &mut *dataset
            } else if subset_keys.iter().any(|k| k == key) {
                &mut *subset
            } else {
                return Err(DataError::config(&section.key(key), "is not a dataset option (see docs/datasets.md for the options)"));
            };
            check_type(section, key, value, in_dataset).map_err(|e| match e {
                DataError::Config { message, .. } => DataError::config(&section.key(written), message),
                other => other,
            })?;
            if let Some(obj) = target.as_object_mut() {
                obj.insert(key.to_string(), value.clone());
            }
        }
        Ok(())
    };

    let mut merged: Option<(DatasetConfig, usize)> = None;
    let mut subsets = Vec::new();
    for (i, entry) in datasets.iter().enumerate() {
        let Value::Object(entry) = entry else {
            return Err(DataError::config(&format!("datasets[{i}]"), "must be a table"));
        };
        let (mut dataset, mut subset_base) = (dataset_defaults.clone(), subset_defaults.clone());
        route(Section::General, &general, &mut dataset, &mut subset_base)?;
        let mut own = entry.clone();
        let listed = own.remove("subsets");
        route(Section::Dataset(i), &own, &mut dataset, &mut subset_base)?;
        let listed = match listed {
            Some(Value::Array(a)) if !a.is_empty() => a,
            _ => return Err(DataError::config(&format!("datasets[{i}].subsets"), "list the dataset's image folders in [[datasets.subsets]]")),
        };
        let mut own_subsets = Vec::new();
        for (j, s) in listed.iter().enumerate() {
            let Value::Object(s) = s else {
                return Err(DataError::config(&format!("datasets[{i}].subsets[{j}]"), "must be a table"));
            };
            if !s.contains_key("image_dir") && !s.contains_key("metadata_file") {
                return Err(DataError::config(&Section::Subset(i, j).key("image_dir"), "is required: the folder of the subset's images (or `metadata_file`, a fine-tuning subset's captions)"));
            }
            let mut subset = subset_base.clone();
            let mut ignored = Value::Object(Map::new());
            route(Section::Subset(i, j), s, &mut ignored, &mut subset)?;
            own_subsets.push(typed::<SubsetConfig>(subset, Section::Subset(i, j), &typing_defaults)?);
        }
        let dataset = typed::<DatasetConfig>(dataset, Section::Dataset(i), &dataset_defaults)?;
        // Checked per dataset, so that messages name the subset as the file places it.
        DatasetConfig { subsets: own_subsets.clone(), ..dataset.clone() }.validate().map_err(|e| match e {
            DataError::Config { key, message } => DataError::Config { key: format!("datasets[{i}].{key}"), message },
            other => other,
        })?;
        subsets.extend(own_subsets);
        match &merged {
            None => merged = Some((dataset, i)),
            Some((first, k)) if *first != dataset => {
                let (a, b) = (serde_json::to_value(first).unwrap_or_default(), serde_json::to_value(&dataset).unwrap_or_default());
                let key = dataset_keys.iter().find(|key| a.get(key.as_str()) != b.get(key.as_str())).cloned().unwrap_or_default();
                return Err(DataError::config(
                    &format!("datasets[{i}].{key}"),
                    format!("differs from datasets[{k}]'s: sd-scripts batches each dataset apart, this trainer takes one resolution, bucket setting and batch size for all (give them the same, or train them separately)"),
                ));
            }
            Some(_) => {}
        }
    }
    let Some((mut config, _)) = merged else {
        return Err(DataError::config("datasets", "list the data in [[datasets]]"));
    };
    config.subsets = subsets;
    config.validate()?;
    Ok(config)
}

/// sd-scripts' `custom_attributes` table (a subset option), of which its training reads
/// `diff_output_preservation`: whether that is set. As in sd-scripts, a table replaces one
/// given above it (a subset's `{}` turns off its dataset's preservation). Other attributes
/// are for sd-scripts users' own code and are errors here, not silently dropped.
fn custom_attributes(section: Section, value: &Value) -> Result<bool> {
    let key = section.key("custom_attributes");
    let Value::Object(attributes) = value else {
        return Err(DataError::config(&key, "must be a table, e.g. `{ diff_output_preservation = true }`"));
    };
    for (name, v) in attributes {
        match (name.as_str(), v) {
            ("diff_output_preservation", Value::Bool(_)) => {}
            ("diff_output_preservation", other) => return Err(DataError::config(&format!("{key}.{name}"), format!("must be true or false, got {other}"))),
            _ => {
                return Err(DataError::config(
                    &format!("{key}.{name}"),
                    "is not read by this trainer: of sd-scripts' custom attributes, only `diff_output_preservation` acts on training",
                ))
            }
        }
    }
    Ok(attributes.get("diff_output_preservation").and_then(Value::as_bool).unwrap_or(false))
}

/// A `[general]`-like table of the document, if present.
fn table(doc: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<Map<String, Value>>> {
    match doc.get(key) {
        None => Ok(None),
        Some(Value::Object(t)) => Ok(Some(t.clone())),
        Some(_) => Err(DataError::ConfigFile { path: path.to_path_buf(), message: format!("`{key}` must be a table ([{key}])") }),
    }
}

/// `value` as `T`; on a type error, the first key whose value alone fails (on `defaults`)
/// is named.
fn typed<T: serde::de::DeserializeOwned>(value: Value, section: Section, defaults: &Value) -> Result<T> {
    serde_json::from_value::<T>(value.clone()).map_err(|e| {
        let culprit = value.as_object().and_then(|obj| {
            obj.iter().find_map(|(key, v)| {
                let mut alone = defaults.clone();
                alone.as_object_mut()?.insert(key.clone(), v.clone());
                serde_json::from_value::<T>(alone).err().map(|err| (key.clone(), err))
            })
        });
        match culprit {
            Some((key, err)) => DataError::config(&section.key(&key), format!("has the wrong type: {err}")),
            None => DataError::config(section.key("").trim_end_matches('.'), format!("is malformed: {e}")),
        }
    })
}
