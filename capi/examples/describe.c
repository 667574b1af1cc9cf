/* describe: load a model, attach a picture, stream the answer, print timings.
 *
 *   cargo build --release -p mipha-capi
 *   cc capi/examples/describe.c -Icapi/include -Ltarget/release -lmipha -o describe
 *   LD_LIBRARY_PATH=target/release ./describe mipha-3b.mqf photo.jpg "What is in the picture?"
 *
 * Optional 4th argument: the most tokens to generate (default 256).
 */
#include <stdio.h>
#include <stdlib.h>

#include "mipha.h"

static int on_token(const char* piece, size_t len, void* user_data) {
    size_t* pieces = user_data;
    ++*pieces;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* go on */
}

static int fail(const char* what, mipha_status st) {
    fprintf(stderr, "describe: %s failed (status %d): %s\n", what, (int)st, mipha_last_error());
    return 1;
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.mqf IMAGE PROMPT [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    if (mipha_abi_version() != MIPHA_ABI_VERSION) {
        fprintf(stderr, "describe: libmipha ABI %u, built against %d\n", mipha_abi_version(), MIPHA_ABI_VERSION);
        return 1;
    }

    mipha_engine_options eo = mipha_engine_options_default();
    eo.kv_cache_mb = 256;
    mipha_engine* engine = NULL;
    mipha_status st = mipha_engine_load(argv[1], &eo, &engine);
    if (st != MIPHA_OK) return fail("loading the model", st);

    mipha_session* session = NULL;
    st = mipha_session_new(engine, &session);
    if (st != MIPHA_OK) return fail("mipha_session_new", st);

    st = mipha_session_attach_image_file(session, argv[2]);
    if (st != MIPHA_OK) return fail("attaching the picture", st);

    mipha_generate_options go = mipha_generate_options_default();
    if (argc > 4) go.max_tokens = (uint32_t)strtoul(argv[4], NULL, 10);

    mipha_reply reply = {0};
    reply.struct_size = sizeof reply;
    size_t pieces = 0;
    st = mipha_session_ask(session, argv[3], &go, NULL, on_token, &pieces, &reply);
    printf("\n");
    if (st != MIPHA_OK) return fail("asking", st);

    fprintf(stderr,
            "[%u prompt positions (%u reused), %u tokens in %zu pieces, stop %d; "
            "pictures %.1f ms, prefill %.1f ms, first token %.1f ms, %.1f tokens/s]\n",
            reply.prompt_tokens, reply.reused_positions, reply.generated_tokens, pieces,
            reply.stop_reason, reply.image_ms, reply.prefill_ms, reply.ttft_ms, reply.decode_tok_s);
    /* The text was streamed already; it is also whole in reply.text. */
    int ok = reply.text != NULL;
    mipha_reply_free(&reply);

    mipha_session_free(session);
    mipha_engine_free(engine);
    return ok ? 0 : 1;
}
