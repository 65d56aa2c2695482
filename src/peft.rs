//! PEFT checkpoints (feature `peft`): an adapter directory as Hugging Face PEFT writes it
//! (`adapter_config.json` + `adapter_model.safetensors`, peft 0.21) read into the crate's
//! own argument shapes.
//!
//! - LoRA (`peft_type: "LORA"`, DoRA included): one [`LoraModule`] per adapted layer, its
//!   `lora_A` [r, in] (`w_down`), `lora_B` [out, r] (`w_up`), optional `lora_B` bias (`b_up`,
//!   `lora_bias`), DoRA magnitude `[out]` (`use_dora`) and the scale `s` (α / r, or α / √r with
//!   `use_rslora`; r and α per module after `rank_pattern` / `alpha_pattern`), ready for
//!   [`crate::delta_linear::DeltaLinearArgs`] ([`LoraModule::op`], [`LoraModule::dims`]),
//!   `lora_merge` and the DoRA operations ([`crate::dora`]); plus the base-layer biases that
//!   `bias = "all"` or `"lora_only"` trained, and the full replacement modules of
//!   `modules_to_save`.
//! - Prefix tuning (`peft_type: "PREFIX_TUNING"`): the stored virtual-token keys and values
//!   of every layer in the prefix kernel's layout, `[kv_heads, l, head_dim]` per layer
//!   ([`PrefixAdapter`]), shared by the batch ([`PrefixAdapter::dims`]).
//!
//! The loader checks the checkpoint against its config: every tensor must belong to a module
//! the config targets (`target_modules` as a list or a regex, `exclude_modules`,
//! `layers_to_transform` / `layers_pattern`, matched as PEFT matches them), hold the shape
//! the config gives it (r from `rank_pattern`), and every tensor the config implies must be
//! there. What a checkpoint asks for that the crate cannot express (embedding LoRA, a
//! `prefix_projection` stored before its projection, an encoder-decoder prefix, a set field
//! the loader does not know, …) is [`Error::Unsupported`] naming the file and the field; what
//! is malformed is [`Error::Checkpoint`] naming the file and the field or tensor. Tensors may
//! be f32, f16 or bf16 (each keeps its dtype; [`Tensor::to`] converts).
//!
//! The base model's own weights are not in an adapter: a layer's frozen weight comes from
//! the model ([`LoraModule::frozen_weight`] puts a GPT-2 `Conv1D` weight, stored [in, out]
//! under `fan_in_fan_out`, into the [out, in] layout the kernels take).

use crate::delta_linear::{DeltaLinear, DeltaLinearDims, LoraMergeDims};
use crate::dora::DoraDims;
use crate::prefix_attention::PrefixAttentionDims;
use crate::{Activation, Composition, DType, Element, Error, Insertion, Result};
use half::{bf16, f16};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// The config file of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The tensor file of an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix of every tensor name of a PEFT model's state dict.
const MODEL_PREFIX: &str = "base_model.model.";

/// A tensor of a checkpoint, copied out of the file (safetensors data is unaligned) in its
/// stored dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: TensorData,
}

/// The elements of a [`Tensor`] in their stored dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Tensor {
    /// The stored dtype.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as stored, when `T` is the stored dtype; else an error naming both.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let bytes: &[u8] = match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
        };
        if T::DTYPE != self.dtype() {
            return Err(Error::invalid(
                "T",
                format!("the tensor's dtype {}", self.dtype()),
                T::DTYPE,
            ));
        }
        Ok(bytemuck::cast_slice(bytes))
    }

    /// The elements converted to `T` (exact when widening, round to nearest even when
    /// narrowing; f16 ↔ bf16 through f32, which holds both exactly).
    pub fn to<T: Element>(&self) -> Vec<T> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| T::from_f32(x)).collect(),
            TensorData::F16(v) => v.iter().map(|x| T::from_f32(x.to_f32())).collect(),
            TensorData::BF16(v) => v.iter().map(|x| T::from_f32(x.to_f32())).collect(),
        }
    }
}

/// What `bias` in a LoRA config trains besides the adapters (PEFT's `bias`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasMode {
    /// `"none"`.
    None,
    /// `"all"`: every bias of the model (saved for modules without LoRA too).
    All,
    /// `"lora_only"`: the biases of the layers that have LoRA.
    LoraOnly,
}

/// Which modules a pattern field (`target_modules`, `exclude_modules`) names.
#[derive(Clone, Debug)]
pub enum ModuleSet {
    /// A list: a module matches when its name is an entry or ends with `.` + an entry.
    Names(Vec<String>),
    /// A string: a regex the whole module name must match.
    Regex(regex::Regex),
    /// `"all-linear"`: every linear layer but the output layer; which ones those are needs
    /// the model, so any module with adapter tensors is accepted.
    AllLinear,
}

impl ModuleSet {
    /// Whether module `name` (e.g. `model.layers.0.self_attn.q_proj`) is in the set.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            ModuleSet::Names(names) => names
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}"))),
            ModuleSet::Regex(re) => re.is_match(name),
            ModuleSet::AllLinear => true,
        }
    }
}

/// The fields of a LoRA `adapter_config.json` that decide the model.
#[derive(Clone, Debug)]
pub struct LoraConfig {
    /// The default rank.
    pub r: usize,
    /// The default α.
    pub lora_alpha: f32,
    /// s = α / √r instead of α / r.
    pub use_rslora: bool,
    /// DoRA: a learned magnitude per output row ([`crate::dora`]).
    pub use_dora: bool,
    /// Per-module ranks, in the file's order: a key matches module `name` when
    /// `(.*\.)?(key)$` matches `name` from its start; the first key that matches wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module α, matched as `rank_pattern`.
    pub alpha_pattern: Vec<(String, f32)>,
    pub target_modules: ModuleSet,
    pub exclude_modules: Option<ModuleSet>,
    /// Only layers with these indices (with a list `target_modules` only, as in PEFT).
    pub layers_to_transform: Option<Vec<usize>>,
    /// The names of the layer lists whose index `layers_to_transform` reads (`layers`, `h`);
    /// empty: the module name's first `.<name>.<index>.`.
    pub layers_pattern: Vec<String>,
    /// The base layer stores its weight [in, out] (GPT-2's `Conv1D`); LoRA's A and B keep
    /// their usual layout.
    pub fan_in_fan_out: bool,
    pub bias: BiasMode,
    /// lora_B has a bias (the delta's `b_up`).
    pub lora_bias: bool,
    /// Modules saved whole (a list; a module matches as in `target_modules`).
    pub modules_to_save: Vec<String>,
    rank_regex: Vec<regex::Regex>,
    alpha_regex: Vec<regex::Regex>,
    layer_regex: Vec<regex::Regex>,
    save_regex: Vec<regex::Regex>,
}

impl LoraConfig {
    /// Whether PEFT attaches LoRA to module `name` (a module path of the base model, as in
    /// `model.layers.0.self_attn.q_proj`): in `target_modules`, not in `exclude_modules`,
    /// and, with `layers_to_transform`, in one of those layers.
    pub fn targets(&self, name: &str) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|e| e.contains(name))
        {
            return false;
        }
        // PEFT never attaches LoRA inside a module it saves whole.
        if self.save_regex.iter().any(|re| re.is_match(name)) {
            return false;
        }
        if !self.target_modules.contains(name) {
            return false;
        }
        let (ModuleSet::Names(_), Some(layers)) = (&self.target_modules, &self.layers_to_transform)
        else {
            return true;
        };
        if layers.is_empty() {
            return true;
        }
        let index = self.layer_regex.iter().find_map(|re| {
            re.captures(name)
                .and_then(|c| c.get(1))
                .and_then(|m| m.as_str().parse::<usize>().ok())
        });
        index.is_some_and(|i| layers.contains(&i))
    }

    /// The rank and α of module `name` after `rank_pattern` and `alpha_pattern`.
    pub fn rank_alpha(&self, name: &str) -> (usize, f32) {
        let r = first_match(&self.rank_regex, name).map_or(self.r, |i| self.rank_pattern[i].1);
        let alpha = first_match(&self.alpha_regex, name)
            .map_or(self.lora_alpha, |i| self.alpha_pattern[i].1);
        (r, alpha)
    }

    /// The LoRA scale s of module `name`: α / r, or α / √r with `use_rslora`.
    pub fn scale(&self, name: &str) -> f32 {
        let (r, alpha) = self.rank_alpha(name);
        let r = r as f64;
        let s = f64::from(alpha) / if self.use_rslora { r.sqrt() } else { r };
        s as f32
    }
}

fn first_match(res: &[regex::Regex], name: &str) -> Option<usize> {
    res.iter().position(|re| re.is_match(name))
}

/// One adapted layer of a LoRA checkpoint.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The module's path in the base model (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// Its rank r (after `rank_pattern`).
    pub r: usize,
    /// Its α (after `alpha_pattern`).
    pub alpha: f32,
    /// The scale s: α / r, or α / √r with `use_rslora`.
    pub scale: f32,
    /// Input features k.
    pub in_features: usize,
    /// Output features n.
    pub out_features: usize,
    /// LoRA A, `lora_A.weight` [r, in]: the delta's `w_down`.
    #[doc(alias = "lora_a")]
    pub w_down: Tensor,
    /// LoRA B, `lora_B.weight` [out, r]: the delta's `w_up`.
    #[doc(alias = "lora_b")]
    pub w_up: Tensor,
    /// `lora_B.bias` `[out]` (`lora_bias`): the delta's `b_up`.
    pub b_up: Option<Tensor>,
    /// DoRA's `lora_magnitude_vector` `[out]` (`use_dora`).
    pub magnitude: Option<Tensor>,
    /// The base layer's trained bias `[out]` (`bias = "all"` or `"lora_only"`), which replaces
    /// the model's.
    pub bias: Option<Tensor>,
    /// The base layer stores its weight [in, out] (`Conv1D`).
    pub fan_in_fan_out: bool,
}

impl LoraModule {
    /// The delta's description: parallel, identity, `h + s·Δh`. (DoRA runs it through
    /// `dora_linear`, which scales the sum per output column before the bias:
    /// [`crate::dora`].)
    pub fn op(&self) -> DeltaLinear {
        DeltaLinear::new(
            Insertion::Parallel,
            Activation::Identity,
            Composition::Scaled(self.scale),
        )
    }

    /// Contiguous dims of this layer for `m` tokens.
    pub fn dims(&self, m: usize) -> DeltaLinearDims {
        DeltaLinearDims::new(m, self.out_features, self.in_features, self.r)
    }

    /// The dims of `lora_merge` for this layer (merge with `scale`, unmerge with `-scale`).
    pub fn merge_dims(&self) -> LoraMergeDims {
        LoraMergeDims {
            n: self.out_features,
            k: self.in_features,
            r: self.r,
        }
    }

    /// The dims of the DoRA operations for this layer ([`crate::dora`]).
    pub fn dora_dims(&self) -> DoraDims {
        DoraDims {
            n: self.out_features,
            k: self.in_features,
            r: self.r,
        }
    }

    /// The base layer's frozen weight as the kernels take it, [out, in], from the weight as
    /// the model stores it: transposed from [in, out] under `fan_in_fan_out`, else copied.
    /// An error when `stored` does not hold out·in elements.
    pub fn frozen_weight<T: Copy>(&self, stored: &[T]) -> Result<Vec<T>> {
        let (n, k) = (self.out_features, self.in_features);
        if stored.len() != n * k {
            return Err(Error::invalid(
                "stored",
                format!(
                    "the base weight of {}: {} elements ({})",
                    self.name,
                    n * k,
                    if self.fan_in_fan_out {
                        format!("[in, out] = [{k}, {n}]")
                    } else {
                        format!("[out, in] = [{n}, {k}]")
                    }
                ),
                format!("{} elements", stored.len()),
            ));
        }
        if !self.fan_in_fan_out {
            return Ok(stored.to_vec());
        }
        Ok((0..n * k).map(|e| stored[(e % k) * n + e / k]).collect())
    }
}

/// A LoRA (or DoRA) checkpoint.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// The adapted layers, ordered by name.
    pub modules: Vec<LoraModule>,
    /// Trained biases of modules without LoRA (`bias = "all"`), by module name; each
    /// replaces the model's.
    pub biases: BTreeMap<String, Tensor>,
    /// The full replacement modules of `modules_to_save`: module name → parameter name
    /// within it (`weight`, `bias`, `dense.weight`, …) → tensor.
    pub modules_to_save: BTreeMap<String, BTreeMap<String, Tensor>>,
}

impl LoraAdapter {
    /// The adapted layer `name`, if there is one.
    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules.iter().find(|m| m.name == name)
    }
}

/// One layer's prefix of a prefix-tuning checkpoint.
#[derive(Clone, Debug)]
pub struct PrefixLayer {
    /// P_k [kv_heads, l, head_dim].
    pub key: Tensor,
    /// P_v [kv_heads, l, head_dim].
    pub value: Tensor,
}

/// A prefix-tuning checkpoint: l virtual tokens' keys and values per layer, in the layout of
/// [`crate::prefix_attention`]'s `prefix_k` / `prefix_v` (one prefix for the whole batch).
#[derive(Clone, Debug)]
pub struct PrefixAdapter {
    /// l.
    pub num_virtual_tokens: usize,
    /// KV heads (PEFT stores the prefix per KV head of a grouped-query model).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// One per transformer layer.
    pub layers: Vec<PrefixLayer>,
}

impl PrefixAdapter {
    /// The dims of `prefix_attention` for a layer with this prefix, the prefix shared by the
    /// batch; every other tensor contiguous `[B, H, L, d]`.
    pub fn dims(
        &self,
        batch: usize,
        heads: usize,
        q_len: usize,
        kv_len: usize,
    ) -> PrefixAttentionDims {
        PrefixAttentionDims::new(
            batch,
            heads,
            self.kv_heads,
            q_len,
            kv_len,
            self.num_virtual_tokens,
            self.head_dim,
        )
        .with_shared_prefix()
    }
}

/// An adapter read by [`load`].
// Read once per adapter: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Adapter {
    Lora(LoraAdapter),
    PrefixTuning(PrefixAdapter),
}

/// Reads the adapter directory `dir` (`adapter_config.json` + `adapter_model.safetensors`).
pub fn load(dir: impl AsRef<Path>) -> Result<Adapter> {
    let dir = dir.as_ref();
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| checkpoint(&config_path, CONFIG_FILE, e.to_string()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| checkpoint(&config_path, CONFIG_FILE, format!("malformed JSON: {e}")))?;
    let Value::Object(fields) = json else {
        return Err(checkpoint(
            &config_path,
            CONFIG_FILE,
            "expected a JSON object",
        ));
    };
    let cfg = Fields {
        path: &config_path,
        fields: &fields,
    };
    let peft_type = cfg.string("peft_type")?;
    if !matches!(peft_type.as_str(), "LORA" | "PREFIX_TUNING") {
        return Err(checkpoint(
            &config_path,
            "peft_type",
            format!("expected \"LORA\" or \"PREFIX_TUNING\", got {peft_type:?}"),
        ));
    }
    let tensors = read_safetensors(&weights_path)?;
    if peft_type == "LORA" {
        Ok(Adapter::Lora(lora(&cfg, &weights_path, tensors)?))
    } else {
        Ok(Adapter::PrefixTuning(prefix(&cfg, &weights_path, tensors)?))
    }
}

fn checkpoint(path: &Path, item: &str, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        item: item.to_string(),
        message: message.into(),
    }
}

/// Every tensor of a safetensors file by name, copied once into aligned memory: for an
/// adapter's tensors, or a model's own weights. An error naming the file, or the file and the
/// tensor whose dtype is not f32, f16 or bf16.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, Tensor>> {
    let path = path.as_ref();
    let file = path
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let bytes = std::fs::read(path).map_err(|e| checkpoint(path, &file, e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| checkpoint(path, &file, format!("malformed safetensors: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => TensorData::F32(copy_unaligned(raw)),
            safetensors::Dtype::F16 => TensorData::F16(copy_unaligned(raw)),
            safetensors::Dtype::BF16 => TensorData::BF16(copy_unaligned(raw)),
            other => {
                return Err(checkpoint(
                    path,
                    &name,
                    format!("dtype {other:?}: the kernels take F32, F16 or BF16"),
                ))
            }
        };
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// Little-endian elements from unaligned bytes (the safetensors format is little-endian).
fn copy_unaligned<T: bytemuck::Pod + Default>(raw: &[u8]) -> Vec<T> {
    let mut v = vec![T::default(); raw.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(raw);
    v
}

/// A config's fields with typed, file-naming accessors.
struct Fields<'a> {
    path: &'a Path,
    fields: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        checkpoint(self.path, field, message)
    }
    fn unsupported(&self, field: &str, why: &str) -> Error {
        Error::Unsupported(format!("{}: field `{field}`: {why}", self.path.display()))
    }
    /// The value, `None` when absent or null.
    fn get(&self, field: &str) -> Option<&Value> {
        self.fields.get(field).filter(|v| !v.is_null())
    }
    fn string(&self, field: &str) -> Result<String> {
        match self.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(field, format!("expected a string, got {v}"))),
            None => Err(self.err(field, "missing")),
        }
    }
    fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match (self.get(field), default) {
            (Some(v), _) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, got {v}"))
            }),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(self.err(field, "missing")),
        }
    }
    fn f32_or(&self, field: &str, default: f32) -> Result<f32> {
        match self.get(field) {
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| x as f32)
                .ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
            None => Ok(default),
        }
    }
    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(field, format!("expected true or false, got {v}"))),
            None => Ok(default),
        }
    }
    /// A list of strings, or one string as a one-element list.
    fn strings(&self, field: &str) -> Result<Vec<String>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err(field, format!("expected strings, got {v}")))
                })
                .collect(),
            Some(v) => Err(self.err(field, format!("expected a list of strings, got {v}"))),
        }
    }
    /// `target_modules` / `exclude_modules`: a list of names or one regex.
    fn module_set(&self, field: &str) -> Result<Option<ModuleSet>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) if s == "all-linear" => Ok(Some(ModuleSet::AllLinear)),
            Some(Value::String(s)) => Ok(Some(ModuleSet::Regex(
                self.regex(field, &format!("^(?:{s})$"))?,
            ))),
            Some(_) => Ok(Some(ModuleSet::Names(self.strings(field)?))),
        }
    }
    fn regex(&self, field: &str, pattern: &str) -> Result<regex::Regex> {
        regex::Regex::new(pattern)
            .map_err(|e| self.err(field, format!("a regex this crate cannot compile: {e}")))
    }
    /// `rank_pattern` / `alpha_pattern`: key → number, in file order.
    fn pattern(&self, field: &str) -> Result<Vec<(String, f64)>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    v.as_f64()
                        .filter(|x| x.is_finite())
                        .map(|x| (k.clone(), x))
                        .ok_or_else(|| {
                            self.err(field, format!("{k:?}: expected a number, got {v}"))
                        })
                })
                .collect(),
            Some(v) => Err(self.err(field, format!("expected an object, got {v}"))),
        }
    }
    /// Every field outside `known` must be unset (absent, null, false, an empty list or
    /// object): the loader cannot tell what an unknown setting would change.
    fn only_known(&self, known: &[&str]) -> Result<()> {
        for (field, v) in self.fields {
            let unset = match v {
                Value::Null | Value::Bool(false) => true,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            };
            if !unset && !known.contains(&field.as_str()) {
                return Err(self.unsupported(
                    field,
                    &format!("set to {v}, which this loader does not know how to apply"),
                ));
            }
        }
        Ok(())
    }
}

/// Fields of every PEFT config that do not change the computation.
const COMMON_FIELDS: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
];

/// LoRA fields the loader applies, or that only matter for training or initialisation.
const LORA_FIELDS: &[&str] = &[
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "lora_bias",
    "modules_to_save",
    // Training or initialisation only:
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "megatron_core",
    "ensure_weight_tying",
    "qalora_group_size",
];

fn lora_config(cfg: &Fields) -> Result<LoraConfig> {
    let mut known: Vec<&str> = COMMON_FIELDS.to_vec();
    known.extend_from_slice(LORA_FIELDS);
    cfg.only_known(&known)?;
    let r = cfg.usize_or("r", Some(8))?;
    if r == 0 {
        return Err(cfg.err("r", "expected a positive integer, got 0"));
    }
    let rank_pattern: Vec<(String, usize)> = cfg
        .pattern("rank_pattern")?
        .into_iter()
        .map(|(k, v)| {
            if v >= 1.0 && v.fract() == 0.0 {
                Ok((k, v as usize))
            } else {
                Err(cfg.err(
                    "rank_pattern",
                    format!("{k:?}: expected a positive integer, got {v}"),
                ))
            }
        })
        .collect::<Result<_>>()?;
    let alpha_pattern: Vec<(String, f32)> = cfg
        .pattern("alpha_pattern")?
        .into_iter()
        .map(|(k, v)| (k, v as f32))
        .collect();
    let suffix = |field: &str, key: &str| cfg.regex(field, &format!(r"^(?:.*\.)?(?:{key})$"));
    let rank_regex = rank_pattern
        .iter()
        .map(|(k, _)| suffix("rank_pattern", k))
        .collect::<Result<_>>()?;
    let alpha_regex = alpha_pattern
        .iter()
        .map(|(k, _)| suffix("alpha_pattern", k))
        .collect::<Result<_>>()?;
    let target_modules = cfg
        .module_set("target_modules")?
        .ok_or_else(|| cfg.err("target_modules", "missing"))?;
    let layers_to_transform = match cfg.get("layers_to_transform") {
        None => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| {
            cfg.err(
                "layers_to_transform",
                format!("expected a layer index, got {n}"),
            )
        })? as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_u64().map(|i| i as usize).ok_or_else(|| {
                        cfg.err(
                            "layers_to_transform",
                            format!("expected layer indices, got {v}"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
        ),
        Some(v) => return Err(cfg.err("layers_to_transform", format!("expected a list, got {v}"))),
    };
    let layers_pattern = cfg.strings("layers_pattern")?;
    // The first numbered segment (lazy), as PEFT reads the layer index.
    let layer_regex = if layers_pattern.is_empty() {
        vec![cfg.regex("layers_pattern", r"^.*?\.[^.]*\.(\d+)\.")?]
    } else {
        layers_pattern
            .iter()
            .map(|p| cfg.regex("layers_pattern", &format!(r"^(?:|.*?\.)(?:{p})\.(\d+)\.")))
            .collect::<Result<_>>()?
    };
    let bias = match cfg.get("bias").and_then(Value::as_str).unwrap_or("none") {
        "none" => BiasMode::None,
        "all" => BiasMode::All,
        "lora_only" => BiasMode::LoraOnly,
        other => {
            return Err(cfg.err(
                "bias",
                format!("expected \"none\", \"all\" or \"lora_only\", got {other:?}"),
            ))
        }
    };
    let modules_to_save = match cfg.get("modules_to_save") {
        Some(Value::String(_)) => return Err(cfg.err("modules_to_save", "expected a list")),
        _ => cfg.strings("modules_to_save")?,
    };
    let save_regex = modules_to_save
        .iter()
        .map(|m| cfg.regex("modules_to_save", &format!(r"^(?:|.*\.)(?:{m})(?:$|\..*)")))
        .collect::<Result<_>>()?;
    Ok(LoraConfig {
        r,
        lora_alpha: cfg.f32_or("lora_alpha", 8.0)?,
        use_rslora: cfg.bool_or("use_rslora", false)?,
        use_dora: cfg.bool_or("use_dora", false)?,
        rank_pattern,
        alpha_pattern,
        target_modules,
        exclude_modules: cfg.module_set("exclude_modules")?,
        layers_to_transform,
        layers_pattern,
        fan_in_fan_out: cfg.bool_or("fan_in_fan_out", false)?,
        bias,
        lora_bias: cfg.bool_or("lora_bias", false)?,
        modules_to_save,
        rank_regex,
        alpha_regex,
        layer_regex,
        save_regex,
    })
}

/// The per-module tensors of a LoRA checkpoint, before their shapes are checked.
#[derive(Default)]
struct Parts {
    a: Option<Tensor>,
    b: Option<Tensor>,
    b_bias: Option<Tensor>,
    magnitude: Option<Tensor>,
}

fn lora(cfg: &Fields, path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<LoraAdapter> {
    let config = lora_config(cfg)?;
    let saved = |module: &str| {
        config
            .modules_to_save
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
    };
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut biases = BTreeMap::new();
    let mut modules_to_save: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (name, t) in tensors {
        let Some(key) = name.strip_prefix(MODEL_PREFIX) else {
            return Err(checkpoint(
                path,
                &name,
                format!("an unexpected tensor: names start with {MODEL_PREFIX:?}"),
            ));
        };
        let lora_part = [
            (".lora_A.weight", 0),
            (".lora_B.weight", 1),
            (".lora_B.bias", 2),
            (".lora_magnitude_vector.weight", 3),
            (".lora_magnitude_vector", 3),
        ]
        .into_iter()
        .find_map(|(suffix, i)| key.strip_suffix(suffix).map(|m| (m, i)));
        if let Some((module, i)) = lora_part {
            let p = parts.entry(module.to_string()).or_default();
            let slot = match i {
                0 => &mut p.a,
                1 => &mut p.b,
                2 => &mut p.b_bias,
                _ => &mut p.magnitude,
            };
            *slot = Some(t);
            continue;
        }
        if key.contains("lora_embedding_") || key.contains(".lora_") {
            return Err(Error::Unsupported(format!(
                "{}: tensor `{name}`: a LoRA form this crate has no kernel for (it has linear \
                 layers only)",
                path.display()
            )));
        }
        // A tensor of a module saved whole: the module is the shortest dotted prefix of the
        // name that modules_to_save names (a classifier head saves `score.dense.weight`, …).
        let whole = key
            .match_indices('.')
            .map(|(i, _)| (&key[..i], &key[i + 1..]))
            .find(|(module, _)| saved(module));
        if let Some((module, param)) = whole {
            modules_to_save
                .entry(module.to_string())
                .or_default()
                .insert(param.to_string(), t);
            continue;
        }
        let (module, param) = key.rsplit_once('.').unwrap_or(("", key));
        // bias = "all" / "lora_only" saves a LoRA layer's own bias as `<module>.base_layer.bias`.
        let module = module.strip_suffix(".base_layer").unwrap_or(module);
        if param == "bias" && config.bias != BiasMode::None {
            biases.insert(module.to_string(), t);
        } else {
            return Err(checkpoint(
                path,
                &name,
                "an unexpected tensor: not a LoRA tensor, a trained bias (bias = \"none\") or \
                 part of modules_to_save",
            ));
        }
    }
    let mut modules = Vec::with_capacity(parts.len());
    for (name, p) in parts {
        if !config.targets(&name) {
            return Err(checkpoint(
                path,
                &format!("{MODEL_PREFIX}{name}"),
                "LoRA tensors of a module the config does not target (target_modules, \
                 exclude_modules, layers_to_transform)",
            ));
        }
        let module = lora_module(&config, path, &name, p, biases.remove(&name))?;
        modules.push(module);
    }
    if config.bias == BiasMode::LoraOnly {
        if let Some(module) = biases.keys().next() {
            return Err(checkpoint(
                path,
                &format!("{MODEL_PREFIX}{module}.bias"),
                "a bias of a module without LoRA, with bias = \"lora_only\"",
            ));
        }
    }
    Ok(LoraAdapter {
        config,
        modules,
        biases,
        modules_to_save,
    })
}

fn lora_module(
    config: &LoraConfig,
    path: &Path,
    name: &str,
    p: Parts,
    bias: Option<Tensor>,
) -> Result<LoraModule> {
    let tensor = |suffix: &str| format!("{MODEL_PREFIX}{name}.{suffix}");
    let missing =
        |suffix: &str, why: &str| checkpoint(path, &tensor(suffix), format!("missing ({why})"));
    let (r, alpha) = config.rank_alpha(name);
    let a =
        p.a.ok_or_else(|| missing("lora_A.weight", "lora_B is there"))?;
    let b =
        p.b.ok_or_else(|| missing("lora_B.weight", "lora_A is there"))?;
    let shape = |t: &Tensor, suffix: &str, expected: &[usize], what: &str| {
        if t.shape == expected {
            Ok(())
        } else {
            Err(checkpoint(
                path,
                &tensor(suffix),
                format!("expected shape {what} = {expected:?}, got {:?}", t.shape),
            ))
        }
    };
    let rank_from = if config.rank_pattern.is_empty() {
        "r"
    } else {
        "r after rank_pattern"
    };
    let k = if a.shape.len() == 2 { a.shape[1] } else { 0 };
    shape(&a, "lora_A.weight", &[r, k], &format!("[{rank_from}, in]"))?;
    let n = if b.shape.len() == 2 { b.shape[0] } else { 0 };
    shape(&b, "lora_B.weight", &[n, r], &format!("[out, {rank_from}]"))?;
    match (&p.b_bias, config.lora_bias) {
        (Some(t), true) => shape(t, "lora_B.bias", &[n], "[out]")?,
        (None, true) => return Err(missing("lora_B.bias", "lora_bias is true")),
        (Some(_), false) => {
            return Err(checkpoint(
                path,
                &tensor("lora_B.bias"),
                "an unexpected tensor: lora_bias is false",
            ))
        }
        (None, false) => {}
    }
    match (&p.magnitude, config.use_dora) {
        (Some(t), true) => shape(t, "lora_magnitude_vector", &[n], "[out]")?,
        (None, true) => return Err(missing("lora_magnitude_vector", "use_dora is true")),
        (Some(_), false) => {
            return Err(checkpoint(
                path,
                &tensor("lora_magnitude_vector"),
                "an unexpected tensor: use_dora is false",
            ))
        }
        (None, false) => {}
    }
    if let Some(t) = &bias {
        shape(t, "bias", &[n], "[out]")?;
    }
    Ok(LoraModule {
        name: name.to_string(),
        r,
        alpha,
        scale: config.scale(name),
        in_features: k,
        out_features: n,
        w_down: a,
        w_up: b,
        b_up: p.b_bias,
        magnitude: p.magnitude,
        bias,
        fan_in_fan_out: config.fan_in_fan_out,
    })
}

/// Prefix-tuning fields the loader applies or that do not change the stored prefix.
const PREFIX_FIELDS: &[&str] = &[
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "prefix_projection",
    "modules_to_save",
    "init_weights",
];

fn prefix(
    cfg: &Fields,
    path: &Path,
    mut tensors: BTreeMap<String, Tensor>,
) -> Result<PrefixAdapter> {
    let mut known: Vec<&str> = COMMON_FIELDS.to_vec();
    known.extend_from_slice(PREFIX_FIELDS);
    cfg.only_known(&known)?;
    if !cfg.strings("modules_to_save")?.is_empty() {
        return Err(cfg.unsupported(
            "modules_to_save",
            "a prefix adapter with replacement modules",
        ));
    }
    let l = cfg.usize_or("num_virtual_tokens", None)?;
    let token_dim = cfg.usize_or("token_dim", None)?;
    let heads = cfg.usize_or("num_attention_heads", None)?;
    let layers = cfg.usize_or("num_layers", None)?;
    let submodules = cfg.usize_or("num_transformer_submodules", Some(1))?;
    if submodules != 1 {
        return Err(cfg.unsupported(
            "num_transformer_submodules",
            &format!("{submodules} (an encoder-decoder prefix); decoder-only models have 1"),
        ));
    }
    if heads == 0 || token_dim % heads != 0 {
        return Err(cfg.err(
            "num_attention_heads",
            format!("a positive divisor of token_dim = {token_dim}, got {heads}"),
        ));
    }
    let d = token_dim / heads;
    const NAME: &str = "prompt_embeddings";
    let Some(emb) = tensors.remove(NAME) else {
        return Err(checkpoint(path, NAME, "missing"));
    };
    if let Some(extra) = tensors.keys().next() {
        return Err(checkpoint(
            path,
            extra,
            format!("an unexpected tensor: a prefix checkpoint holds {NAME} only"),
        ));
    }
    let width = layers * 2 * token_dim;
    if emb.shape != [l, width] {
        if cfg.bool_or("prefix_projection", false)? && emb.shape == [l, token_dim] {
            return Err(cfg.unsupported(
                "prefix_projection",
                "the prefix was saved before its projection (inference_mode at save); save it \
                 with inference_mode false so the projected keys and values are stored",
            ));
        }
        return Err(checkpoint(
            path,
            NAME,
            format!(
                "expected shape [num_virtual_tokens, num_layers·2·token_dim] = [{l}, {width}], \
                 got {:?}",
                emb.shape
            ),
        ));
    }
    // PEFT views each virtual token's row as [num_layers·2, heads, d]: layer i's key is slice
    // 2i, its value 2i + 1; the kernel wants [heads, l, d] per layer.
    let gather = |slot: usize| -> Tensor {
        let index = |e: usize| {
            let (h, rest) = (e / (l * d), e % (l * d));
            let (j, c) = (rest / d, rest % d);
            j * width + slot * token_dim + h * d + c
        };
        let data = match &emb.data {
            TensorData::F32(v) => {
                TensorData::F32((0..heads * l * d).map(|e| v[index(e)]).collect())
            }
            TensorData::F16(v) => {
                TensorData::F16((0..heads * l * d).map(|e| v[index(e)]).collect())
            }
            TensorData::BF16(v) => {
                TensorData::BF16((0..heads * l * d).map(|e| v[index(e)]).collect())
            }
        };
        Tensor {
            shape: vec![heads, l, d],
            data,
        }
    };
    Ok(PrefixAdapter {
        num_virtual_tokens: l,
        kv_heads: heads,
        head_dim: d,
        layers: (0..layers)
            .map(|i| PrefixLayer {
                key: gather(2 * i),
                value: gather(2 * i + 1),
            })
            .collect(),
    })
}
