// Logits of every position of a few token sequences, from libllama, with or without a LoRA adapter.
//
// The LoRA calls are the ones `llama-cli --lora FILE` makes (common_init_from_params: llama_adapter_lora_init,
// then llama_set_adapters_lora with scale 1). Built and run by benchmarks/serving_check.py; not part of the
// package. The KV cache is float32 and flash attention off, so that the engine's own floor (no adapter, against
// transformers on the same float32 weights) is float32 rounding.
//
// Usage: serving_check_llama MODEL.gguf TOKENS.txt OUT.f32 [LORA.gguf]
//   TOKENS.txt: one sequence per line, token ids separated by spaces.
//   OUT.f32:    float32 logits, the sequences one after the other, each (n_tokens, n_vocab) row-major.
// Prints "n_vocab N" on success; exits 1 with one line on stderr on failure.

#include "llama.h"

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static int fail(const std::string & message) {
    std::fprintf(stderr, "serving_check_llama: %s\n", message.c_str());
    return 1;
}

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc != 4 && argc != 5) {
        return fail("usage: serving_check_llama MODEL.gguf TOKENS.txt OUT.f32 [LORA.gguf]");
    }
    std::vector<std::vector<llama_token>> sequences;
    std::ifstream tokens_file(argv[2]);
    for (std::string line; std::getline(tokens_file, line);) {
        std::istringstream ids(line);
        std::vector<llama_token> sequence;
        for (llama_token id; ids >> id;) {
            sequence.push_back(id);
        }
        if (!sequence.empty()) {
            sequences.push_back(sequence);
        }
    }
    if (sequences.empty()) {
        return fail(std::string("no token sequences in ") + argv[2]);
    }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (model == nullptr) {
        return fail(std::string("cannot load the model ") + argv[1]);
    }
    size_t longest = 0;
    for (const auto & sequence : sequences) {
        longest = std::max(longest, sequence.size());
    }
    llama_context_params context_params = llama_context_default_params();
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = (uint32_t) longest;
    context_params.n_threads = context_params.n_threads_batch = 2;
    context_params.type_k = context_params.type_v = GGML_TYPE_F32;
    context_params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * context = llama_init_from_model(model, context_params);
    if (context == nullptr) {
        return fail("cannot create a context");
    }
    if (argc == 5) {
        llama_adapter_lora * adapter = llama_adapter_lora_init(model, argv[4]);
        if (adapter == nullptr) {
            return fail(std::string("cannot load the LoRA adapter ") + argv[4]);
        }
        float scale = 1.0f;
        if (llama_set_adapters_lora(context, &adapter, 1, &scale) != 0) {
            return fail(std::string("cannot apply the LoRA adapter ") + argv[4]);
        }
    }

    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::ofstream out(argv[3], std::ios::binary);
    for (const auto & sequence : sequences) {
        llama_memory_clear(llama_get_memory(context), true);
        llama_batch batch = llama_batch_init((int32_t) sequence.size(), 0, 1);
        for (size_t i = 0; i < sequence.size(); ++i) {
            batch.token[i] = sequence[i];
            batch.pos[i] = (llama_pos) i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;  // every position's logits, not only the last
        }
        batch.n_tokens = (int32_t) sequence.size();
        if (llama_decode(context, batch) != 0) {
            return fail("llama_decode failed");
        }
        for (size_t i = 0; i < sequence.size(); ++i) {
            out.write(reinterpret_cast<const char *>(llama_get_logits_ith(context, (int32_t) i)),
                      sizeof(float) * n_vocab);
        }
        llama_batch_free(batch);
    }
    out.close();
    if (!out) {
        return fail(std::string("cannot write ") + argv[3]);
    }
    std::printf("n_vocab %d\n", n_vocab);
    llama_free(context);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
