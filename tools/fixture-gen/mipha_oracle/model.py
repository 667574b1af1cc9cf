"""The model: transformers' SiglipVisionModel + mlp2x_gelu projector + PhiForCausalLM, f32 compute.

Assembled like the authors' `MiphaPhiForCausalLM` (mipha/model/mipha_arch.py,
multimodal_encoder/siglip_encoder.py, multimodal_projector/builder.py):
  * vision: `vision_tower(pixels, output_hidden_states=True).hidden_states[select_layer]`
    (select_layer -2, no post_layernorm, all tokens kept: SigLIP has no CLS token);
  * projector: Sequential(Linear, nn.GELU() [exact erf], Linear);
  * LM: PhiForCausalLM on inputs_embeds where each -200 is replaced by that image's vectors,
    positions 0..T-1; greedy decoding then feeds one token id at a time with the KV cache.

Weights come from the checkpoint AS STORED (f16/bf16/f32) and are upcast to f32.
"""

import torch
from torch import nn
from transformers import PhiConfig, PhiForCausalLM, SiglipVisionConfig, SiglipVisionModel

from . import IMAGE_TOKEN_INDEX

VISION_PREFIX = "model.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _load_strict(module, sd, what):
    missing, unexpected = module.load_state_dict(sd, strict=False)
    # position_ids (SigLIP) and rotary inv_freq (Phi) are non-persistent buffers, never in a checkpoint.
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing {missing}, unexpected {unexpected}")


class MiphaOracle:
    def __init__(self, config, state_dict, attn_implementation="eager"):
        """config: parsed config.json; state_dict: checkpoint names -> tensors (any float dtype)."""
        sd = {k: v.detach().to(torch.float32) for k, v in state_dict.items()}
        self.config = config
        tower = config["vision_config"]["vision_tower"]
        proj = config["vision_config"]["mm_projector"]
        assert proj["mm_projector_type"] == "mlp2x_gelu"
        assert tower["mm_vision_select_feature"] == "patch"
        self.select_layer = tower["mm_vision_select_layer"]

        vcfg = SiglipVisionConfig(
            hidden_size=tower["hidden_size"],
            intermediate_size=tower["intermediate_size"],
            num_hidden_layers=tower["num_hidden_layers"],
            num_attention_heads=tower["num_attention_heads"],
            num_channels=tower["num_channels"],
            image_size=tower["image_size"],
            patch_size=tower["patch_size"],
            hidden_act=tower["hidden_act"],
            layer_norm_eps=tower["layer_norm_eps"],
            attention_dropout=tower["attention_dropout"],
            vision_use_head=True,  # the checkpoint carries the pooling head (unused by Mipha)
        )
        vcfg._attn_implementation = attn_implementation
        self.vision = SiglipVisionModel(vcfg).eval()
        # transformers 5 flattened SiglipVisionModel: its parameters are `embeddings.*`, `encoder.*`,
        # `post_layernorm.*`, `head.*` (4.37 had them under `vision_model.`).
        vsd = _strip(sd, VISION_PREFIX)
        if hasattr(self.vision, "vision_model"):  # transformers 4.x layout
            vsd = {"vision_model." + k: v for k, v in vsd.items()}
        _load_strict(self.vision, vsd, "vision tower")

        hidden = config["hidden_size"]
        self.projector = nn.Sequential(
            nn.Linear(proj["mm_hidden_size"], hidden),
            nn.GELU(),  # exact erf GELU
            nn.Linear(hidden, hidden),
        ).eval()
        _load_strict(self.projector, _strip(sd, PROJECTOR_PREFIX), "projector")

        pcfg = PhiConfig(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config["num_key_value_heads"],
            hidden_act=config["hidden_act"],
            max_position_embeddings=config["max_position_embeddings"],
            layer_norm_eps=config["layer_norm_eps"],
            partial_rotary_factor=config["partial_rotary_factor"],
            rope_theta=config["rope_theta"],
            qk_layernorm=config["qk_layernorm"],
            tie_word_embeddings=config["tie_word_embeddings"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
        pcfg._attn_implementation = attn_implementation
        self.lm = PhiForCausalLM(pcfg).eval()
        lsd = {
            k: v
            for k, v in sd.items()
            if not k.startswith(VISION_PREFIX) and not k.startswith(PROJECTOR_PREFIX)
        }
        _load_strict(self.lm, lsd, "phi")
        assert self.lm.lm_head.weight.data_ptr() != self.lm.model.embed_tokens.weight.data_ptr()
        self.n_layers = config["num_hidden_layers"]
        self.vocab_size = config["vocab_size"]

    # ---------------------------------------------------------------- vision + projector
    @torch.no_grad()
    def encode_images(self, pixel_values):
        """pixel_values [N,3,S,S] -> dict of [N, ...] tensors (one image per vision pass, as the authors)."""
        hs_all, sel_all, fc1_all, emb_all = [], [], [], []
        for i in range(pixel_values.shape[0]):
            out = self.vision(pixel_values[i : i + 1], output_hidden_states=True)
            hs = torch.stack([h[0] for h in out.hidden_states])  # [Lv+1, P, Dv]
            selected = out.hidden_states[self.select_layer][0]  # [P, Dv]
            fc1_gelu = self.projector[1](self.projector[0](selected))
            embeds = self.projector[2](fc1_gelu)
            hs_all.append(hs)
            sel_all.append(selected)
            fc1_all.append(fc1_gelu)
            emb_all.append(embeds)
        return {
            "vision.hidden_states": torch.stack(hs_all),
            "vision.selected": torch.stack(sel_all),
            "projector.fc1_gelu": torch.stack(fc1_all),
            "image_embeds": torch.stack(emb_all),
        }

    # ---------------------------------------------------------------- splicing
    @torch.no_grad()
    def splice(self, input_ids, image_embeds):
        """input_ids: list[int] with -200 placeholders; image_embeds [N,P,H] in placeholder order.

        Returns inputs_embeds [T,H] and the start position of each image in the sequence."""
        embed = self.lm.model.embed_tokens
        pieces, starts, chunk, pos, img = [], [], [], 0, 0
        for t in list(input_ids) + [None]:
            if t is None or t == IMAGE_TOKEN_INDEX:
                if chunk:
                    pieces.append(embed(torch.tensor(chunk, dtype=torch.long)))
                    pos += len(chunk)
                    chunk = []
                if t is not None:
                    pieces.append(image_embeds[img])
                    starts.append(pos)
                    pos += image_embeds[img].shape[0]
                    img += 1
            else:
                chunk.append(t)
        assert image_embeds is None or img == len(image_embeds), "placeholder count != image count"
        return torch.cat(pieces, dim=0), starts

    # ---------------------------------------------------------------- language model
    @torch.no_grad()
    def prefill(self, inputs_embeds):
        """Full causal pass over [T,H]; returns layer outputs, final hidden, logits, and the KV cache."""
        captured = []
        hooks = [
            layer.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
            for layer in self.lm.model.layers
        ]
        final = []
        hooks.append(self.lm.model.final_layernorm.register_forward_hook(lambda m, a, o: final.append(o)))
        try:
            T = inputs_embeds.shape[0]
            out = self.lm(
                inputs_embeds=inputs_embeds[None],
                position_ids=torch.arange(T)[None],
                use_cache=True,
            )
        finally:
            for h in hooks:
                h.remove()
        assert len(captured) == self.n_layers and len(final) == 1
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values  # transformers 4.x name
        return {
            "lm.layer_outputs": torch.stack([c[0] for c in captured]),
            "lm.final_hidden": final[0][0],
            "logits": out.logits[0],
            "cache": cache,
        }

    @torch.no_grad()
    def decode_step(self, token_id, position, cache):
        out = self.lm(
            input_ids=torch.tensor([[token_id]], dtype=torch.long),
            position_ids=torch.tensor([[position]], dtype=torch.long),
            cache=cache,
            use_cache=True,
        )
        return out.logits[0, -1]

    @torch.no_grad()
    def full_logits(self, inputs_embeds):
        """No-cache full recompute (for the KV-cache self-check)."""
        T = inputs_embeds.shape[0]
        out = self.lm(inputs_embeds=inputs_embeds[None], position_ids=torch.arange(T)[None], use_cache=False)
        return out.logits[0]

    @torch.no_grad()
    def embed_ids(self, ids):
        return self.lm.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
