// The arm64 parity probe: the app's inference path (text GGUF + mmproj through llama.cpp's mtmd),
// built for the phone's instruction set and run under qemu by src/runtime/arm64.py.
//
// It does what src/runtime/llama_vlm.py's LlamaVLM.generate does on x86, call for call: the prompt goes
// in verbatim (add_special and parse_special on), the canvas as raw RGB (no file decoding), each mtmd
// chunk through mtmd_helper_eval_chunk_single with logits on the last position, flash attention off
// (llama-cpp-python's default), then greedy decoding (the first highest logit, as numpy's argmax)
// until an end-of-generation token or max_new_tokens. One process runs every image: loading the model
// under emulation costs more than one image.
//
// Usage: probe TEXT_GGUF MMPROJ PROMPT_FILE MAX_NEW_TOKENS N_CTX N_THREADS OUT_DIR [W H RGB_FILE]...
// Per image i it writes OUT_DIR/<i>.logits (the first answer token's logits, n_vocab float32, native
// byte order) and prints one line:
//   {"i": i, "n_vocab": V, "tokens": [...], "stopped": true, "text_hex": "..."}
// text_hex is the answer's bytes as llama-cpp-python's detokenize(special=False) forms them.
// Any failure prints one line to stderr naming the step and exits non-zero.

#include "llama.h"
#include "mtmd.h"
#include "mtmd-helper.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level, const char *, void *) {}

[[noreturn]] static void die(const std::string & msg) {
    fprintf(stderr, "probe: %s\n", msg.c_str());
    exit(1);
}

static std::vector<unsigned char> read_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read " + path);
    return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

static std::string piece(const llama_vocab * vocab, llama_token tok) {
    char buf[256];
    int n = llama_token_to_piece(vocab, tok, buf, sizeof(buf), 0, false);
    if (n < 0) die("token " + std::to_string(tok) + " has a piece longer than 256 bytes");
    return std::string(buf, n);
}

int main(int argc, char ** argv) {
    if (argc < 8 || (argc - 8) % 3 != 0) {
        die("usage: probe TEXT_GGUF MMPROJ PROMPT_FILE MAX_NEW_TOKENS N_CTX N_THREADS OUT_DIR [W H RGB_FILE]...");
    }
    const std::string text_gguf = argv[1], mmproj = argv[2], out_dir = argv[7];
    const std::vector<unsigned char> prompt_bytes = read_file(argv[3]);
    const std::string prompt(prompt_bytes.begin(), prompt_bytes.end());
    const int max_new = atoi(argv[4]), n_ctx = atoi(argv[5]), n_threads = atoi(argv[6]);

    llama_log_set(quiet, nullptr);
    mtmd_log_set(quiet, nullptr);
    mtmd_helper_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(text_gguf.c_str(), mp);
    if (!model) die("cannot load " + text_gguf);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    // llama-cpp-python's Llama(n_ctx=n, n_batch=n, n_ubatch=n, flash_attn=False), as LlamaVLM opens it
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_ctx;
    cp.n_ubatch = n_ctx;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * lctx = llama_init_from_model(model, cp);
    if (!lctx) die("cannot create a llama context for " + text_gguf);

    mtmd_context_params mparams = mtmd_context_params_default();
    mparams.use_gpu = false;
    mparams.print_timings = false;
    mparams.warmup = false;
    mparams.n_threads = n_threads;
    mtmd_context * mctx = mtmd_init_from_file(mmproj.c_str(), model, mparams);
    if (!mctx) die("mtmd could not load " + mmproj + " for " + text_gguf);

    for (int i = 0; 8 + 3 * i < argc; ++i) {
        const int w = atoi(argv[8 + 3 * i]), h = atoi(argv[9 + 3 * i]);
        const std::string rgb_path = argv[10 + 3 * i];
        const std::vector<unsigned char> rgb = read_file(rgb_path);
        if (rgb.size() != (size_t) w * h * 3) die(rgb_path + " holds " + std::to_string(rgb.size()) + " bytes, not "
                                                  + std::to_string(w) + "x" + std::to_string(h) + "x3");

        llama_memory_clear(llama_get_memory(lctx), true);
        mtmd_bitmap * bitmap = mtmd_bitmap_init(w, h, rgb.data());
        mtmd_input_text text = {prompt.c_str(), prompt.size(), true, true};
        mtmd_input_chunks * chunks = mtmd_input_chunks_init();
        const mtmd_bitmap * bitmaps[1] = {bitmap};
        int32_t rc = mtmd_tokenize(mctx, chunks, &text, bitmaps, 1);
        mtmd_bitmap_free(bitmap);
        if (rc != 0) die("mtmd_tokenize failed (" + std::to_string(rc) + ") for " + rgb_path);

        llama_pos n_past = 0;
        for (size_t c = 0; c < mtmd_input_chunks_size(chunks); ++c) {
            llama_pos new_past = n_past;  // the text path adds to it, the image path sets it
            rc = mtmd_helper_eval_chunk_single(mctx, lctx, mtmd_input_chunks_get(chunks, c), n_past, 0, n_ctx,
                                               true, &new_past);
            if (rc != 0) die("mtmd_helper_eval_chunk_single failed (" + std::to_string(rc) + ") for " + rgb_path);
            n_past = new_past;
        }
        mtmd_input_chunks_free(chunks);

        const float * logits = llama_get_logits_ith(lctx, -1);
        const std::string logits_path = out_dir + "/" + std::to_string(i) + ".logits";
        FILE * f = fopen(logits_path.c_str(), "wb");
        if (!f || fwrite(logits, sizeof(float), n_vocab, f) != (size_t) n_vocab || fclose(f) != 0) {
            die("cannot write " + logits_path);
        }

        std::vector<llama_token> tokens;
        bool stopped = false;
        for (int step = 0; step < max_new; ++step) {
            llama_token tok = 0;
            for (int t = 1; t < n_vocab; ++t) {
                if (logits[t] > logits[tok]) tok = t;
            }
            if (llama_vocab_is_eog(vocab, tok)) {
                stopped = true;
                break;
            }
            tokens.push_back(tok);
            llama_batch batch = llama_batch_get_one(&tokens.back(), 1);
            if (llama_decode(lctx, batch) != 0) die("llama_decode failed for " + rgb_path);
            logits = llama_get_logits_ith(lctx, -1);
        }

        std::string answer;
        for (llama_token t : tokens) answer += piece(vocab, t);
        // llama-cpp-python drops a leading space when the first token is BOS (its detokenize)
        if (!tokens.empty() && tokens[0] == llama_vocab_bos(vocab) && !answer.empty() && answer[0] == ' ') {
            answer.erase(0, 1);
        }
        std::string hex;
        char b[3];
        for (unsigned char ch : answer) {
            snprintf(b, sizeof(b), "%02x", ch);
            hex += b;
        }
        std::string ids;
        for (size_t k = 0; k < tokens.size(); ++k) ids += (k ? ", " : "") + std::to_string(tokens[k]);
        printf("{\"i\": %d, \"n_vocab\": %d, \"tokens\": [%s], \"stopped\": %s, \"text_hex\": \"%s\"}\n", i, n_vocab,
               ids.c_str(), stopped ? "true" : "false", hex.c_str());
        fflush(stdout);
    }

    mtmd_free(mctx);
    llama_free(lctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
