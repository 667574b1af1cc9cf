"""Independent Python oracle for the Mipha-3B architecture (SigLIP -> mlp2x_gelu -> Phi-2).

Built from transformers' own `SiglipVisionModel` and `PhiForCausalLM`, assembled the way the
authors' code (zhuyiche/llava-phi, `mipha/`) does it, computed in float32 with eager attention.
Architecture facts: shared/reference/mipha-architecture.md.
"""

IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
EOS_TOKEN_ID = 50256
N_GEN = 8
TOPK = 32
