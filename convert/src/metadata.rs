//! The metadata keys of a Mipha `.mqf` file (`docs/mqf-keys.md`).

use mipha_kernels::QuantType;
use mipha_runtime::MetaValue;

use crate::config::{ImageConfig, ModelConfig};
use crate::tokenizer::TokenizerInfo;

pub const ARCHITECTURE: &str = "mipha-phi";
pub const IMAGE_TOKEN_INDEX: i64 = -200;
pub const IMAGE_PLACEHOLDER: &str = "<image>";
pub const CHAT_TEMPLATE: &str = "phi";
/// `conv_phi_v0` of the authors' `mipha/conversation.py`.
pub const CHAT_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

pub fn converter_version() -> String {
    format!("mipha-convert {}", env!("CARGO_PKG_VERSION"))
}

/// What differs between a conversion and a synthetic model.
pub struct Provenance {
    pub name: String,
    pub source_files: Vec<String>,
    pub source_sha256: Vec<String>,
    pub quant: QuantType,
    pub vision_quant: QuantType,
    pub fallbacks: Vec<String>,
    pub dropped: Vec<String>,
    pub synth_seed: Option<u64>,
}

fn u(n: usize) -> MetaValue {
    MetaValue::U64(n as u64)
}

fn s(x: &str) -> MetaValue {
    MetaValue::Str(x.to_string())
}

fn strs<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> MetaValue {
    MetaValue::Array(items.into_iter().map(|x| s(x.as_ref())).collect())
}

pub fn build(
    cfg: &ModelConfig,
    image: &ImageConfig,
    tok: &TokenizerInfo,
    prov: &Provenance,
) -> Vec<(String, MetaValue)> {
    let mut m: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |k: &str, v: MetaValue| m.push((k.to_string(), v));

    put("general.architecture", s(ARCHITECTURE));
    put("general.name", s(&prov.name));
    put("general.converter", s(&converter_version()));
    put("general.source_files", strs(&prov.source_files));
    put("general.source_sha256", strs(&prov.source_sha256));
    put("general.quant", s(prov.quant.name()));
    put("general.vision_quant", s(prov.vision_quant.name()));
    put("general.quant_fallbacks", strs(&prov.fallbacks));
    put("general.dropped_tensors", strs(&prov.dropped));
    if let Some(seed) = prov.synth_seed {
        put("general.synthetic", MetaValue::Bool(true));
        put("general.synth_seed", MetaValue::U64(seed));
    }

    let lm = &cfg.lm;
    put("lm.vocab_size", u(lm.vocab_size));
    put("lm.hidden_size", u(lm.hidden_size));
    put("lm.intermediate_size", u(lm.intermediate_size));
    put("lm.num_hidden_layers", u(lm.num_hidden_layers));
    put("lm.num_attention_heads", u(lm.num_attention_heads));
    put("lm.num_key_value_heads", u(lm.num_key_value_heads));
    put("lm.head_dim", u(lm.head_dim));
    put("lm.rotary_dims", u(lm.rotary_dims));
    put("lm.rope_theta", MetaValue::F64(lm.rope_theta));
    put("lm.layer_norm_eps", MetaValue::F64(lm.layer_norm_eps));
    put("lm.max_position_embeddings", u(lm.max_position_embeddings));
    put("lm.hidden_act", s(&lm.hidden_act));

    let v = &cfg.vision;
    put("vision.hidden_size", u(v.hidden_size));
    put("vision.intermediate_size", u(v.intermediate_size));
    put("vision.num_hidden_layers", u(v.kept_layers));
    put(
        "vision.num_hidden_layers_checkpoint",
        u(v.num_hidden_layers),
    );
    put("vision.num_attention_heads", u(v.num_attention_heads));
    put("vision.image_size", u(v.image_size));
    put("vision.patch_size", u(v.patch_size));
    put("vision.num_channels", u(v.num_channels));
    put("vision.layer_norm_eps", MetaValue::F64(v.layer_norm_eps));
    put("vision.hidden_act", s(&v.hidden_act));
    put("vision.select_layer", MetaValue::I64(v.select_layer));
    put("vision.select_feature", s(&v.select_feature));
    let p = &cfg.projector;
    put("projector.type", s(&p.ty));
    put("projector.input_size", u(p.input_size));
    put("projector.hidden_size", u(p.hidden_size));

    put(
        "tokenizer.huggingface.json",
        MetaValue::Bytes(tok.json.clone()),
    );
    let eos = tok.eos_id as u64;
    put("tokenizer.eos_token_id", MetaValue::U64(eos));
    put("tokenizer.bos_token_id", MetaValue::U64(eos));
    put("tokenizer.pad_token_id", MetaValue::U64(eos));
    put("tokenizer.add_bos", MetaValue::Bool(false));
    put(
        "tokenizer.image_token_index",
        MetaValue::I64(IMAGE_TOKEN_INDEX),
    );
    put("tokenizer.image_placeholder", s(IMAGE_PLACEHOLDER));
    put("chat.template", s(CHAT_TEMPLATE));
    put("chat.system", s(CHAT_SYSTEM));
    put("chat.roles", strs(["USER", "ASSISTANT"]));
    put("chat.sep", s(" "));
    put("chat.sep2", s("<|endoftext|>"));

    put(
        "image.size",
        MetaValue::Array(image.size.iter().map(|&x| MetaValue::U64(x)).collect()),
    );
    put(
        "image.mean",
        MetaValue::Array(image.mean.iter().map(|&x| MetaValue::F64(x)).collect()),
    );
    put(
        "image.std",
        MetaValue::Array(image.std.iter().map(|&x| MetaValue::F64(x)).collect()),
    );
    put("image.rescale_factor", MetaValue::F64(image.rescale_factor));
    put("image.resample", s(&image.resample));
    put("image.aspect", s(&cfg.image_aspect_ratio));
    put(
        "image.pad_color",
        MetaValue::Array(image.pad_color().into_iter().map(MetaValue::U64).collect()),
    );
    m
}
