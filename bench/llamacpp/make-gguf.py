# A random-weight Phi-2 (Mipha-3B's language model, 51200 vocabulary) as GGUF F16, for
# llama-bench: the shapes of `mipha-convert synth`, the real Phi-2 tokenizer. `llama-quantize`
# makes the Q4_0, Q8_0 and BF16 files from it. Needs `pip install gguf numpy`.
#   python3 bench/llamacpp/make-gguf.py phi2-f16.gguf path/to/phi2-tokenizer
import json, sys
import numpy as np
import gguf

out = sys.argv[1]
tokdir = sys.argv[2]
H, FF, L, V, HEADS = 2560, 10240, 32, 51200, 32
tok = json.load(open(f"{tokdir}/tokenizer.json"))
vocab = tok["model"]["vocab"]
added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
ids = {**vocab, **added}
tokens = [f"[PAD{i}]" for i in range(V)]
types = [gguf.TokenType.UNUSED] * V
for t, i in ids.items():
    if i < V:
        tokens[i] = t
        types[i] = gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL
merges = tok["model"]["merges"]
merges = [m if isinstance(m, str) else " ".join(m) for m in merges]

w = gguf.GGUFWriter(out, "phi2")
w.add_name("mipha-3b-synth-phi2")
w.add_context_length(2048)
w.add_embedding_length(H)
w.add_feed_forward_length(FF)
w.add_block_count(L)
w.add_head_count(HEADS)
w.add_head_count_kv(HEADS)
w.add_layer_norm_eps(1e-5)
w.add_rope_dimension_count(32)
w.add_rope_freq_base(10000.0)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("phi-2")
w.add_token_list(tokens)
w.add_token_types(types)
w.add_token_merges(merges)
w.add_bos_token_id(50256)
w.add_eos_token_id(50256)

rng = np.random.default_rng(0)
def mat(r, c):
    return (rng.standard_normal((r, c), dtype=np.float32) * 0.02).astype(np.float16)
def vec(n, one=False):
    return (np.ones(n, np.float32) if one else rng.standard_normal(n, dtype=np.float32) * 0.02)

w.add_tensor("token_embd.weight", mat(V, H))
for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", vec(H, True))
    w.add_tensor(p + "attn_norm.bias", vec(H))
    w.add_tensor(p + "attn_qkv.weight", mat(3 * H, H))
    w.add_tensor(p + "attn_qkv.bias", vec(3 * H))
    w.add_tensor(p + "attn_output.weight", mat(H, H))
    w.add_tensor(p + "attn_output.bias", vec(H))
    w.add_tensor(p + "ffn_up.weight", mat(FF, H))
    w.add_tensor(p + "ffn_up.bias", vec(FF))
    w.add_tensor(p + "ffn_down.weight", mat(H, FF))
    w.add_tensor(p + "ffn_down.bias", vec(H))
w.add_tensor("output_norm.weight", vec(H, True))
w.add_tensor("output_norm.bias", vec(H))
w.add_tensor("output.weight", mat(V, H))
w.add_tensor("output.bias", vec(V))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
