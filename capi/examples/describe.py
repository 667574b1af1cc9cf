#!/usr/bin/env python3
"""describe.py: the C API from Python through ctypes (no compiler needed).

    cargo build --release -p mipha-capi
    MIPHA_LIB=target/release/libmipha.so python3 capi/examples/describe.py \
        mipha-3b.mqf photo.jpg "What is in the picture?" [MAX_TOKENS]

MIPHA_LIB defaults to target/release/libmipha.so next to this checkout.
"""
import ctypes
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char_p, c_double, c_float,
                    c_int, c_size_t, c_uint32, c_uint64, c_void_p, sizeof)

ABI_VERSION = 1
OK, ERR_CANCELLED = 0, 7


class EngineOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("threads", c_uint32), ("device", c_char_p),
                ("kv_cache_mb", c_uint64), ("max_memory_mb", c_uint64),
                ("max_sequences", c_uint32), ("kv_dtype", c_uint32), ("verify", c_int),
                ("max_queue", c_uint32)]


class GenerateOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("max_tokens", c_uint32), ("temperature", c_float),
                ("top_k", c_uint32), ("top_p", c_float), ("min_p", c_float),
                ("repeat_penalty", c_float), ("seed", c_uint64), ("ignore_eos", c_int),
                ("parse_special", c_int), ("deadline_ms", c_uint64),
                ("presence_penalty", c_float), ("frequency_penalty", c_float)]


class Reply(Structure):
    # `text` as a void pointer: ctypes would copy (and lose) a c_char_p.
    _fields_ = [("struct_size", c_size_t), ("text", c_void_p), ("text_len", c_size_t),
                ("prompt_tokens", c_uint32), ("generated_tokens", c_uint32),
                ("reused_positions", c_uint32), ("stop_reason", c_int),
                ("prefill_ms", c_double), ("ttft_ms", c_double), ("decode_tok_s", c_double),
                ("prefill_positions", c_uint32), ("images_encoded", c_uint32),
                ("images_cached", c_uint32), ("preemptions", c_uint32),
                ("queued_ms", c_double), ("decode_ms", c_double), ("image_ms", c_double),
                ("prefill_tok_s", c_double)]


TOKEN_CALLBACK = CFUNCTYPE(c_int, POINTER(ctypes.c_char), c_size_t, c_void_p)


def load_library():
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                           "target", "release", "libmipha.so")
    lib = ctypes.CDLL(os.environ.get("MIPHA_LIB", default))
    lib.mipha_abi_version.restype = c_uint32
    lib.mipha_last_error.restype = c_char_p
    lib.mipha_engine_options_default.restype = EngineOptions
    lib.mipha_generate_options_default.restype = GenerateOptions
    lib.mipha_engine_load.argtypes = [c_char_p, POINTER(EngineOptions), POINTER(c_void_p)]
    lib.mipha_engine_free.argtypes = [c_void_p]
    lib.mipha_session_new.argtypes = [c_void_p, POINTER(c_void_p)]
    lib.mipha_session_free.argtypes = [c_void_p]
    lib.mipha_session_attach_image_file.argtypes = [c_void_p, c_char_p]
    lib.mipha_session_ask.argtypes = [c_void_p, c_char_p, POINTER(GenerateOptions), c_void_p,
                                      TOKEN_CALLBACK, c_void_p, POINTER(Reply)]
    lib.mipha_reply_free.argtypes = [POINTER(Reply)]
    return lib


class MiphaError(Exception):
    pass


def check(lib, status, what):
    if status != OK:
        raise MiphaError(f"{what}: status {status}: {lib.mipha_last_error().decode()}")


def main():
    if len(sys.argv) < 4:
        print(f"usage: {sys.argv[0]} MODEL.mqf IMAGE PROMPT [MAX_TOKENS]", file=sys.stderr)
        return 2
    lib = load_library()
    if lib.mipha_abi_version() != ABI_VERSION:
        raise MiphaError(f"libmipha ABI {lib.mipha_abi_version()}, expected {ABI_VERSION}")
    model, image, prompt = (a.encode() for a in sys.argv[1:4])

    opts = lib.mipha_engine_options_default()
    opts.kv_cache_mb = 256
    engine = c_void_p()
    check(lib, lib.mipha_engine_load(model, byref(opts), byref(engine)), "loading the model")
    session = c_void_p()
    try:
        check(lib, lib.mipha_session_new(engine, byref(session)), "mipha_session_new")
        check(lib, lib.mipha_session_attach_image_file(session, image), "attaching the picture")

        gen = lib.mipha_generate_options_default()
        if len(sys.argv) > 4:
            gen.max_tokens = int(sys.argv[4])
        pieces = []

        @TOKEN_CALLBACK
        def on_token(piece, length, _user_data):
            text = ctypes.string_at(piece, length).decode("utf-8")
            pieces.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
            return 0

        reply = Reply(struct_size=sizeof(Reply))
        check(lib, lib.mipha_session_ask(session, prompt, byref(gen), None, on_token, None,
                                         byref(reply)), "asking")
        print()
        try:
            text = ctypes.string_at(reply.text, reply.text_len).decode("utf-8")
            assert text == "".join(pieces), "the streamed pieces make the reply's text"
            print(f"[{reply.prompt_tokens} prompt positions, {reply.generated_tokens} tokens, "
                  f"stop {reply.stop_reason}; prefill {reply.prefill_ms:.1f} ms, first token "
                  f"{reply.ttft_ms:.1f} ms, {reply.decode_tok_s:.1f} tokens/s]", file=sys.stderr)
        finally:
            lib.mipha_reply_free(byref(reply))
    finally:
        lib.mipha_session_free(session)
        lib.mipha_engine_free(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
