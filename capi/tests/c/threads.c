/* threads: one engine, four threads each with its own session, one answer
 * cancelled mid-stream from another thread; then NULL and invalid arguments.
 * Run under AddressSanitizer (or valgrind) by capi/tests/c_programs.rs.
 *
 *   threads MODEL.mqf IMAGE.png
 *
 * Prints "threads: ok" and exits 0 when every check passed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mipha.h"

static atomic_int failures;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "threads.c:%d: check failed: %s (last error: %s)\n", __LINE__, \
                    #cond, mipha_last_error());                                            \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

#define EXPECT(call, status)                                                              \
    do {                                                                                  \
        mipha_status st_ = (call);                                                        \
        if (st_ != (status)) {                                                            \
            fprintf(stderr, "threads.c:%d: %s returned %d, expected %d (%s)\n", __LINE__, \
                    #call, (int)st_, (int)(status), mipha_last_error());                  \
            failures++;                                                                   \
        } else if ((status) != MIPHA_OK && mipha_last_error()[0] == '\0') {               \
            fprintf(stderr, "threads.c:%d: %s failed without a message\n", __LINE__,      \
                    #call);                                                               \
            failures++;                                                                   \
        }                                                                                 \
    } while (0)

enum { N_THREADS = 4, VICTIM = 3, MAX_TOKENS = 24, VICTIM_MAX_TOKENS = 1000 };

static const char* image_path;
static mipha_engine* engine;
static mipha_cancel_token* victim_token;
static atomic_int victim_started;
static atomic_int cancel_sent;

typedef struct {
    int index;
    size_t pieces;
    mipha_status status;
    mipha_reply reply;
} job;

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int on_token(const char* piece, size_t len, void* user_data) {
    job* j = user_data;
    if (piece == NULL || strlen(piece) != len) failures++; /* NUL-terminated, len bytes */
    j->pieces++;
    if (j->index == VICTIM && j->pieces == 1) {
        /* Hold the answer here until the main thread has cancelled it: the
         * engine runs at most a window of tokens ahead, so it cannot finish. */
        atomic_store(&victim_started, 1);
        for (int i = 0; i < 20000 && !atomic_load(&cancel_sent); i++) sleep_ms(1);
    }
    return 0;
}

static void* run(void* arg) {
    job* j = arg;
    mipha_session* s = NULL;
    j->status = mipha_session_new(engine, &s);
    if (j->status != MIPHA_OK) return NULL;
    j->status = mipha_session_attach_image_file(s, image_path);
    if (j->status != MIPHA_OK) {
        mipha_session_free(s);
        return NULL;
    }
    mipha_generate_options go = mipha_generate_options_default();
    go.ignore_eos = 1;
    go.max_tokens = j->index == VICTIM ? VICTIM_MAX_TOKENS : MAX_TOKENS;
    j->reply.struct_size = sizeof j->reply;
    j->status = mipha_session_ask(s, "Describe the picture.", &go,
                                  j->index == VICTIM ? victim_token : NULL, on_token, j, &j->reply);
    mipha_session_free(s);
    return NULL;
}

typedef struct {
    mipha_session* session;
    int count;
    mipha_status reentrant;
} stopper;

static int stop_after_three(const char* piece, size_t len, void* user_data) {
    (void)piece;
    (void)len;
    stopper* st = user_data;
    /* The session is inside mipha_session_ask: another call on it is refused. */
    st->reentrant = mipha_session_reset(st->session);
    return ++st->count >= 3;
}

static uint8_t* read_file(const char* path, size_t* len) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t* buf = malloc((size_t)n);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

static void invalid_arguments(const char* model_path) {
    mipha_engine* e = (mipha_engine*)0x1;
    EXPECT(mipha_engine_load(NULL, NULL, &e), MIPHA_ERR_INVALID_ARGUMENT);
    CHECK(e == NULL);
    EXPECT(mipha_engine_load(model_path, NULL, NULL), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_engine_load("/nonexistent/model.mqf", NULL, &e), MIPHA_ERR_IO);
    EXPECT(mipha_engine_load(image_path, NULL, &e), MIPHA_ERR_FORMAT);
    mipha_engine_options eo = mipha_engine_options_default();
    eo.struct_size = 4;
    EXPECT(mipha_engine_load(model_path, &eo, &e), MIPHA_ERR_INVALID_ARGUMENT);
    eo = mipha_engine_options_default();
    eo.device = "tpu";
    EXPECT(mipha_engine_load(model_path, &eo, &e), MIPHA_ERR_INVALID_ARGUMENT);
    eo = mipha_engine_options_default();
    eo.max_memory_mb = 1;
    EXPECT(mipha_engine_load(model_path, &eo, &e), MIPHA_ERR_OUT_OF_MEMORY);
    CHECK(e == NULL);

    mipha_session* s = (mipha_session*)0x1;
    EXPECT(mipha_session_new(NULL, &s), MIPHA_ERR_INVALID_ARGUMENT);
    CHECK(s == NULL);
    int not_a_handle = 0;
    EXPECT(mipha_session_new((mipha_engine*)&not_a_handle, &s), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_new(engine, NULL), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_reset(NULL), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_file(NULL, image_path), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_ask(NULL, "hi", NULL, NULL, NULL, NULL, NULL), MIPHA_ERR_INVALID_ARGUMENT);

    EXPECT(mipha_session_new(engine, &s), MIPHA_OK);
    CHECK(mipha_last_error()[0] == '\0');
    /* An engine handle is not a session, a session is not a token. */
    EXPECT(mipha_session_reset((mipha_session*)engine), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_ask(s, "hi", NULL, (mipha_cancel_token*)s, NULL, NULL, NULL),
           MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_file(s, NULL), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_file(s, "/nonexistent/picture.png"), MIPHA_ERR_IO);
    EXPECT(mipha_session_attach_image_file(s, model_path), MIPHA_ERR_IMAGE);
    EXPECT(mipha_session_attach_image_bytes(s, (const uint8_t*)"not a picture", 13), MIPHA_ERR_IMAGE);
    EXPECT(mipha_session_attach_image_bytes(s, NULL, 5), MIPHA_ERR_INVALID_ARGUMENT);
    uint8_t rgb[8 * 10 * 3];
    for (size_t i = 0; i < sizeof rgb; i++) rgb[i] = (uint8_t)(i * 7);
    EXPECT(mipha_session_attach_image_rgb8(s, rgb, 0, 8, 0), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_rgb8(s, rgb, 8, 8, 5), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_rgb8(s, NULL, 8, 8, 0), MIPHA_ERR_INVALID_ARGUMENT);
    EXPECT(mipha_session_attach_image_rgb8(s, rgb, 8, 8, 30), MIPHA_OK); /* rows with padding */
    EXPECT(mipha_session_reset(s), MIPHA_OK);

    mipha_reply r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    EXPECT(mipha_session_ask(s, NULL, NULL, NULL, NULL, NULL, &r), MIPHA_ERR_INVALID_ARGUMENT);
    CHECK(r.text == NULL && r.stop_reason == MIPHA_STOP_NONE);
    EXPECT(mipha_session_ask(s, "bad \xff\xfe utf-8", NULL, NULL, NULL, NULL, &r),
           MIPHA_ERR_INVALID_ARGUMENT);
    mipha_generate_options go = mipha_generate_options_default();
    go.temperature = -1.0f;
    EXPECT(mipha_session_ask(s, "hi", &go, NULL, NULL, NULL, &r), MIPHA_ERR_INVALID_ARGUMENT);
    go = mipha_generate_options_default();
    go.struct_size = 8;
    EXPECT(mipha_session_ask(s, "hi", &go, NULL, NULL, NULL, &r), MIPHA_ERR_INVALID_ARGUMENT);
    r.struct_size = 8;
    EXPECT(mipha_session_ask(s, "hi", NULL, NULL, NULL, NULL, &r), MIPHA_ERR_INVALID_ARGUMENT);

    /* A caller built against the first version's minimum structs. */
    go = mipha_generate_options_default();
    go.struct_size = MIPHA_GENERATE_OPTIONS_MIN_SIZE;
    go.max_tokens = 5;
    go.ignore_eos = 1;
    go.deadline_ms = 1; /* beyond its size: must not be read */
    memset(&r, 0xAB, sizeof r);
    r.struct_size = MIPHA_REPLY_MIN_SIZE;
    EXPECT(mipha_session_ask(s, "Say something.", &go, NULL, NULL, NULL, &r), MIPHA_OK);
    CHECK(r.generated_tokens == 5 && r.stop_reason == MIPHA_STOP_MAX_TOKENS);
    CHECK(r.text != NULL && strlen(r.text) == r.text_len);
    CHECK(r.prefill_positions == 0xABABABABu); /* beyond its size: not written */
    mipha_reply_free(&r);
    CHECK(r.text == NULL);
    mipha_reply_free(&r); /* twice: harmless */

    /* A picture from memory. */
    size_t png_len = 0;
    uint8_t* png = read_file(image_path, &png_len);
    CHECK(png != NULL);
    EXPECT(mipha_session_attach_image_bytes(s, png, png_len), MIPHA_OK);
    free(png);

    /* The callback stops the answer (and cannot re-enter its own session). */
    stopper stop = {s, 0, MIPHA_OK};
    go = mipha_generate_options_default();
    go.ignore_eos = 1;
    go.max_tokens = 50;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    EXPECT(mipha_session_ask(s, "Count.", &go, NULL, stop_after_three, &stop, &r), MIPHA_OK);
    CHECK(r.stop_reason == MIPHA_STOP_CALLBACK && r.generated_tokens < 50);
    CHECK(r.images_encoded + r.images_cached == 1);
    CHECK(stop.reentrant == MIPHA_ERR_BUSY);
    mipha_reply_free(&r);

    /* A deadline far shorter than the answer. */
    go.max_tokens = 1000;
    go.deadline_ms = 1;
    EXPECT(mipha_session_ask(s, "Take your time.", &go, NULL, NULL, NULL, &r), MIPHA_OK);
    CHECK(r.stop_reason == MIPHA_STOP_DEADLINE && r.generated_tokens < 1000);
    mipha_reply_free(&r);
    go.deadline_ms = 0;

    /* An already-cancelled token. */
    mipha_cancel_token* t = mipha_cancel_token_new();
    CHECK(t != NULL);
    mipha_cancel_token_cancel(t);
    EXPECT(mipha_session_ask(s, "Anything?", &go, t, NULL, NULL, &r), MIPHA_ERR_CANCELLED);
    CHECK(r.stop_reason == MIPHA_STOP_CANCELLED && r.text != NULL);
    mipha_reply_free(&r);
    mipha_cancel_token_free(t);
    /* Freed handles are errors (the registry knows them no more), not crashes. */
    EXPECT(mipha_session_ask(s, "Anything?", &go, t, NULL, NULL, &r), MIPHA_ERR_INVALID_ARGUMENT);
    mipha_cancel_token_cancel(t);

    mipha_session_free(s);
    EXPECT(mipha_session_reset(s), MIPHA_ERR_INVALID_ARGUMENT);
    mipha_session_free(s);
    CHECK(mipha_last_error()[0] != '\0'); /* "not a live session handle" */

    mipha_engine_free(NULL);
    mipha_session_free(NULL);
    mipha_cancel_token_free(NULL);
    mipha_cancel_token_cancel(NULL);
    mipha_reply_free(NULL);
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.mqf IMAGE\n", argv[0]);
        return 2;
    }
    image_path = argv[2];
    CHECK(mipha_abi_version() == MIPHA_ABI_VERSION);
    CHECK(mipha_last_error() != NULL);

    mipha_engine_options eo = mipha_engine_options_default();
    eo.kv_cache_mb = 64;
    eo.threads = 2;
    EXPECT(mipha_engine_load(argv[1], &eo, &engine), MIPHA_OK);
    if (engine == NULL) return 1;

    victim_token = mipha_cancel_token_new();
    pthread_t threads[N_THREADS];
    job jobs[N_THREADS];
    memset(jobs, 0, sizeof jobs);
    for (int i = 0; i < N_THREADS; i++) {
        jobs[i].index = i;
        pthread_create(&threads[i], NULL, run, &jobs[i]);
    }
    /* Cancel the victim once it has streamed its first piece. */
    for (int i = 0; i < 60000 && !atomic_load(&victim_started); i++) sleep_ms(1);
    CHECK(atomic_load(&victim_started));
    mipha_cancel_token_cancel(victim_token);
    atomic_store(&cancel_sent, 1);
    for (int i = 0; i < N_THREADS; i++) pthread_join(threads[i], NULL);

    for (int i = 0; i < N_THREADS; i++) {
        job* j = &jobs[i];
        if (i == VICTIM) {
            CHECK(j->status == MIPHA_ERR_CANCELLED);
            CHECK(j->reply.stop_reason == MIPHA_STOP_CANCELLED);
            CHECK(j->reply.generated_tokens >= 1 && j->reply.generated_tokens < VICTIM_MAX_TOKENS);
        } else {
            CHECK(j->status == MIPHA_OK);
            CHECK(j->reply.stop_reason == MIPHA_STOP_MAX_TOKENS);
            CHECK(j->reply.generated_tokens == MAX_TOKENS);
            CHECK(j->pieces >= 1);
            /* Same picture, prompt and greedy options: the same answer, batched or not. */
            CHECK(j->reply.text != NULL && jobs[0].reply.text != NULL &&
                  strcmp(j->reply.text, jobs[0].reply.text) == 0);
        }
        printf("thread %d: status %d, stop %d, %u tokens, %zu pieces, %.1f tok/s\n", i,
               (int)j->status, j->reply.stop_reason, j->reply.generated_tokens, j->pieces,
               j->reply.decode_tok_s);
    }
    for (int i = 0; i < N_THREADS; i++) mipha_reply_free(&jobs[i].reply);
    mipha_cancel_token_free(victim_token);

    invalid_arguments(argv[1]);

    mipha_engine_free(engine);
    if (failures) {
        fprintf(stderr, "threads: %d checks failed\n", (int)failures);
        return 1;
    }
    printf("threads: ok\n");
    return 0;
}
