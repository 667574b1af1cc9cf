/*
 * mipha.h: the C API of the Mipha-3B runtime (libmipha.so / libmipha.a).
 *
 * Build:  cargo build --release -p mipha-capi
 * Link:   cc app.c -Icapi/include -Ltarget/release -lmipha
 *         (static: target/release/libmipha.a -lpthread -ldl -lm)
 * Guide:  docs/c-api.md
 *
 * ABI and versioning
 *   MIPHA_ABI_VERSION changes only on an incompatible change (a function or
 *   field removed or changed). New functions and new struct fields may be
 *   added without changing it; fields are only ever appended to the structs.
 *   Check at start-up:  mipha_abi_version() == MIPHA_ABI_VERSION.
 *
 * Structs with struct_size (options and reply)
 *   Start from mipha_*_default() (or zero the struct and set struct_size =
 *   sizeof(the struct)); every field's 0 means its default. The library reads
 *   (options) or writes (reply) only the fields that fit in struct_size, so a
 *   program built against an older, smaller header keeps working with a newer
 *   library. struct_size smaller than the first version's struct
 *   (MIPHA_*_MIN_SIZE below) is MIPHA_ERR_INVALID_ARGUMENT. A larger one (a
 *   program built against a newer header) is accepted when the bytes this
 *   library does not know are all zero (fields left at their defaults), else
 *   it is MIPHA_ERR_INVALID_ARGUMENT; a larger reply has its unknown bytes
 *   zeroed.
 *
 * Errors
 *   Every fallible call returns a mipha_status; mipha_last_error() then says
 *   why, in English (thread-local; "" after a success; never NULL). NULL or
 *   unknown handles (freed ones, or of another type) are
 *   MIPHA_ERR_INVALID_ARGUMENT, never a crash; the *_free functions accept
 *   NULL as a no-op. A panic inside the library is MIPHA_ERR_INTERNAL.
 *
 * Threads
 *   Thread-safe (any thread, concurrently): mipha_abi_version,
 *   mipha_last_error (per thread), the *_default functions, mipha_engine_load,
 *   mipha_engine_free, mipha_session_new (many sessions on one engine, from
 *   many threads: the engine batches their answers together), mipha_session_free,
 *   mipha_reply_free (on different replies), and all mipha_cancel_token_*
 *   functions (mipha_cancel_token_cancel is meant to be called from another
 *   thread while an answer streams).
 *   One call at a time per session: a session may move between threads, but a
 *   second concurrent call on the same session returns MIPHA_ERR_BUSY.
 *   The token callback runs on the thread that called mipha_session_ask.
 *   Freeing a handle while another thread is inside a call on it is safe: the
 *   object lives until that call returns. Using it after that is an error.
 *
 * Ownership
 *   Handles (engine, session, cancel token) belong to the caller, who frees
 *   each exactly once with its *_free function. Sessions keep their engine
 *   loaded: mipha_engine_free may come before the sessions' frees.
 *   mipha_reply.text belongs to the caller: free it with mipha_reply_free
 *   (not free()). Strings passed in are borrowed for the call only. The
 *   piece given to the callback, and mipha_last_error()'s string, belong to
 *   the library and are valid only during the callback / until the next call
 *   on this thread.
 */
#ifndef MIPHA_H
#define MIPHA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MIPHA_ABI_VERSION 1

/* Opaque handles. */
typedef struct mipha_engine mipha_engine;             /* a loaded model */
typedef struct mipha_session mipha_session;           /* one conversation */
typedef struct mipha_cancel_token mipha_cancel_token; /* stops answers */

typedef enum {
    MIPHA_OK = 0,
    MIPHA_ERR_INVALID_ARGUMENT = 1, /* NULL/unknown handle, bad option, prompt not UTF-8, ... */
    MIPHA_ERR_IO = 2,               /* a file could not be read */
    MIPHA_ERR_FORMAT = 3,           /* not a (valid) .mqf model file */
    MIPHA_ERR_IMAGE = 4,            /* a picture could not be decoded or is refused */
    MIPHA_ERR_CONTEXT_FULL = 5,     /* the conversation does not fit the context / KV cache */
    MIPHA_ERR_BUSY = 6,             /* engine queue full, or the session is in use: retry later */
    MIPHA_ERR_CANCELLED = 7,        /* the cancel token stopped the answer (reply still filled) */
    MIPHA_ERR_INTERNAL = 8,         /* a bug (a panic inside the library) */
    MIPHA_ERR_OUT_OF_MEMORY = 9     /* the engine would need more memory than allowed */
} mipha_status;

/* mipha_reply.stop_reason */
typedef enum {
    MIPHA_STOP_NONE = 0,         /* no answer (the call failed) */
    MIPHA_STOP_EOS = 1,          /* the model ended its answer */
    MIPHA_STOP_MAX_TOKENS = 2,   /* generate options' max_tokens reached */
    MIPHA_STOP_CONTEXT_FULL = 3, /* the conversation filled the context */
    MIPHA_STOP_CANCELLED = 4,    /* the cancel token (status MIPHA_ERR_CANCELLED) */
    MIPHA_STOP_DEADLINE = 5,     /* generate options' deadline_ms passed */
    MIPHA_STOP_CALLBACK = 6      /* the token callback returned non-zero */
} mipha_stop_reason;

/* mipha_engine_options.kv_dtype */
typedef enum {
    MIPHA_KV_F16 = 0, /* default: half the memory */
    MIPHA_KV_F32 = 1  /* exact against an f32 reference */
} mipha_kv_dtype;

typedef struct {
    size_t struct_size;  /* sizeof(mipha_engine_options) */
    uint32_t threads;    /* CPU threads; 0 = one per core */
    const char* device;  /* "cpu" (also NULL), "cuda", "cuda:N" or "auto"; borrowed */
    uint64_t kv_cache_mb; /* KV cache budget in MiB; 0 = 1024 */
    /* --- end of MIPHA_ENGINE_OPTIONS_MIN_SIZE --- */
    uint64_t max_memory_mb; /* refuse to load above this; 0 = the memory available */
    uint32_t max_sequences; /* answers decoded together; 0 = 16 */
    uint32_t kv_dtype;      /* a mipha_kv_dtype; 0 = f16 */
    int verify;             /* non-zero: check every tensor's checksum at load */
    uint32_t max_queue;     /* requests waiting before MIPHA_ERR_BUSY; 0 = 256 */
} mipha_engine_options;

typedef struct {
    size_t struct_size;    /* sizeof(mipha_generate_options) */
    uint32_t max_tokens;   /* 0 = 256 */
    float temperature;     /* 0 = greedy (the default) */
    uint32_t top_k;        /* 0 = off */
    float top_p;           /* (0, 1]; 1 = off (0 reads as 1) */
    float min_p;           /* [0, 1]; 0 = off */
    float repeat_penalty;  /* > 0; 1 = off (0 reads as 1) */
    uint64_t seed;
    int ignore_eos;        /* non-zero: keep going past the end of the answer */
    /* --- end of MIPHA_GENERATE_OPTIONS_MIN_SIZE --- */
    int parse_special;     /* non-zero: "<|endoftext|>" in the prompt is the control token */
    uint64_t deadline_ms;  /* stop (MIPHA_STOP_DEADLINE) this long after the call; 0 = none */
    float presence_penalty;  /* [-2, 2]; 0 = off */
    float frequency_penalty; /* [-2, 2]; 0 = off */
} mipha_generate_options;

typedef struct {
    size_t struct_size;        /* set by the caller: sizeof(mipha_reply) */
    char* text;                /* the answer, UTF-8, NUL-terminated; owned: mipha_reply_free */
    size_t text_len;           /* bytes of text, the NUL excluded */
    uint32_t prompt_tokens;    /* positions of the whole conversation's prompt (pictures included) */
    uint32_t generated_tokens; /* tokens of the answer */
    uint32_t reused_positions; /* prompt positions found in the KV cache, not computed */
    int stop_reason;           /* a mipha_stop_reason */
    double prefill_ms, ttft_ms, decode_tok_s;
    /* --- end of MIPHA_REPLY_MIN_SIZE --- */
    uint32_t prefill_positions; /* prompt positions computed for this question */
    uint32_t images_encoded;    /* pictures encoded for this question */
    uint32_t images_cached;     /* pictures found in the engine's cache */
    uint32_t preemptions;       /* times the answer gave its KV to others and recomputed */
    double queued_ms;           /* waiting behind other requests */
    double decode_ms;           /* from the first token to the end */
    double image_ms;            /* decoding and encoding this question's pictures */
    double prefill_tok_s;
} mipha_reply;

/* The first version's minimum struct_size of each struct (64-bit targets). */
#define MIPHA_ENGINE_OPTIONS_MIN_SIZE   (offsetof(mipha_engine_options, max_memory_mb))
#define MIPHA_GENERATE_OPTIONS_MIN_SIZE (offsetof(mipha_generate_options, parse_special))
#define MIPHA_REPLY_MIN_SIZE            (offsetof(mipha_reply, prefill_positions))

/* Called with each piece of the answer as it is generated, on the thread that
 * called mipha_session_ask. `piece` is UTF-8 (whole characters), `len` bytes,
 * NUL-terminated, valid only during the call. Return 0 to go on, non-zero to
 * stop (stop_reason MIPHA_STOP_CALLBACK, status MIPHA_OK). Must not unwind
 * (C++ exceptions, longjmp) through the library. It may call
 * mipha_cancel_token_cancel and other sessions' functions; a call on its own
 * session returns MIPHA_ERR_BUSY. */
typedef int (*mipha_token_callback)(const char* piece, size_t len, void* user_data);

/* MIPHA_ABI_VERSION of the library. */
uint32_t mipha_abi_version(void);

/* Why this thread's last call failed; "" after a success. Owned by the
 * library, valid until the next mipha_* call on this thread. Never NULL. */
const char* mipha_last_error(void);

/* Every field at its default, struct_size set. */
mipha_engine_options mipha_engine_options_default(void);
mipha_generate_options mipha_generate_options_default(void);

/* Loads a .mqf model file. opts may be NULL (defaults). On success *out is a
 * new engine (owned: mipha_engine_free); on failure *out is NULL. Errors:
 * INVALID_ARGUMENT (NULL path/out, bad option), IO, FORMAT, OUT_OF_MEMORY. */
mipha_status mipha_engine_load(const char* path, const mipha_engine_options* opts, mipha_engine** out);

/* Drops the caller's reference. The model is unloaded once no session uses
 * it either. NULL: no-op. */
void mipha_engine_free(mipha_engine* engine);

/* A new empty conversation on engine (owned: mipha_session_free). On failure
 * *out is NULL. */
mipha_status mipha_session_new(mipha_engine* engine, mipha_session** out);

/* Frees a session and gives its KV cache back to the engine. NULL: no-op. */
void mipha_session_free(mipha_session* session);

/* Forgets the conversation and any pending pictures. */
mipha_status mipha_session_reset(mipha_session* session);

/* Attach a picture to the next question (several may be attached). Errors:
 * IO (unreadable file), IMAGE (undecodable, too large, too many pictures),
 * INVALID_ARGUMENT (the model has no vision tower, NULL arguments),
 * CONTEXT_FULL (the pictures alone fill the context). On error the session
 * is unchanged. */
mipha_status mipha_session_attach_image_file(mipha_session* s, const char* path);
/* Encoded bytes: JPEG, PNG, WebP, GIF or BMP. Borrowed for the call. */
mipha_status mipha_session_attach_image_bytes(mipha_session* s, const uint8_t* data, size_t len);
/* Raw 8-bit RGB, rows `stride` bytes apart (0 = width * 3). Borrowed for the call. */
mipha_status mipha_session_attach_image_rgb8(mipha_session* s, const uint8_t* rgb, uint32_t width, uint32_t height, size_t stride);

/* Asks prompt (UTF-8, else INVALID_ARGUMENT) about the pictures attached
 * since the last question, streaming the answer through on_token (may be
 * NULL) on this thread; blocks until the answer ends. opts may be NULL
 * (defaults). cancel may be NULL; mipha_cancel_token_cancel(cancel) from any
 * thread stops the answer: status MIPHA_ERR_CANCELLED, with `out` still
 * filled with what was said. out may be NULL; else set out->struct_size
 * first: it is written on success and on CANCELLED (out->text owned by the
 * caller: mipha_reply_free), and emptied (text NULL, stop_reason NONE) on
 * every other error. out->text is overwritten, not freed: free the previous
 * reply first. The question and answer stay in the conversation; on an error
 * the question is withdrawn and the session is as before. */
mipha_status mipha_session_ask(mipha_session* s, const char* prompt, const mipha_generate_options* opts,
                               const mipha_cancel_token* cancel, mipha_token_callback on_token,
                               void* user_data, mipha_reply* out);

/* Frees reply->text and sets it to NULL (so a second call is harmless).
 * NULL: no-op. */
void mipha_reply_free(mipha_reply* reply);

/* A new token, not cancelled (owned: mipha_cancel_token_free). One token may
 * serve several answers; once cancelled it stays cancelled. NULL only on an
 * internal error. */
mipha_cancel_token* mipha_cancel_token_new(void);
/* Cancels the answers using t. Any thread, any time. NULL or freed: no-op. */
void mipha_cancel_token_cancel(const mipha_cancel_token* t);
/* Frees t; an answer running with it is not affected. NULL: no-op. */
void mipha_cancel_token_free(mipha_cancel_token* t);

#ifdef __cplusplus
}
#endif

#endif /* MIPHA_H */
