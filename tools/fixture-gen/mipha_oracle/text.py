"""Conversation template `phi` and chunk-wise tokenization around <image> (mipha/conversation.py,
mipha/mm_utils.py::tokenizer_image_token)."""

import os

from . import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def first_user_message(question, n_images):
    """The authors prepend "<image>\\n" once to the first user message (single image). For several
    images (our extension, not in the authors' CLI) we write one "<image>\\n" per image."""
    return (IMAGE_PLACEHOLDER + "\n") * n_images + question


def phi_prompt(user_message):
    """conv_phi_v0, style TWO, sep " ", one user turn, open assistant turn."""
    return SYSTEM + " " + "USER: " + user_message + " " + "ASSISTANT:"


class Tokenizers:
    """transformers' tokenizer from the checkpoint's vocab.json/merges.txt (as the authors load it) and
    the `tokenizers` library on the reference tokenizer.json (cross-check)."""

    def __init__(self, ckpt_dir, tokenizer_json):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(ckpt_dir)
        self.tj = None
        if tokenizer_json and os.path.exists(tokenizer_json):
            import tokenizers

            self.tj = tokenizers.Tokenizer.from_file(tokenizer_json)

    def _chunks(self, prompt, encode):
        chunks = [encode(c) for c in prompt.split(IMAGE_PLACEHOLDER)]
        ids = []
        for i, c in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(c)
        return ids

    def image_token_ids(self, prompt):
        """Returns (ids from transformers, ids from tokenizer.json or None, transformers added a BOS?)."""
        bos_seen = []

        def enc_hf(chunk):
            ids = self.hf(chunk).input_ids  # as the authors call it (default add_special_tokens)
            if ids and ids[0] == self.hf.bos_token_id and not chunk.startswith(self.hf.bos_token):
                bos_seen.append(True)  # would be kept by tokenizer_image_token; never happens for phi-2
            return ids

        hf_ids = self._chunks(prompt, enc_hf)
        tj_ids = None
        if self.tj is not None:
            tj_ids = self._chunks(prompt, lambda c: self.tj.encode(c, add_special_tokens=False).ids)
        return hf_ids, tj_ids, bool(bos_seen)

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
