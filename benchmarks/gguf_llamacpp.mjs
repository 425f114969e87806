// llama.cpp's side of benchmarks/gguf_llamacpp.py: load each GGUF file with node-llama-cpp's prebuilt llama.cpp,
// tokenize the prompts, score them token by token and continue them greedily.
//
//     node benchmarks/gguf_llamacpp.mjs NODE_PREFIX request.json result.json
//
// NODE_PREFIX is the folder `npm i -E node-llama-cpp@3.21.1` ran in (it holds node_modules/node-llama-cpp). The
// request names the files ({label, path}), the prompts ({name, text}), the number of greedy tokens and the threads.
// The result holds, per file, whether llama.cpp loaded it (else its error and log), what it read from the metadata,
// and per setting and prompt: the token ids (special tokens parsed or not), each prompt token's log-probability given the ones
// before it (llama.cpp's logits, softmax over the whole vocabulary), and the greedy continuation with the
// log-probability of each chosen token. Greedy sampling applies no top-k/top-p, so the probabilities are the plain
// softmax of the logits (node-llama-cpp's AddonContext.cpp normalizes the unfiltered candidates).
// Nothing is downloaded or built: the prebuilt binary is used or the script fails.

import {readFileSync, writeFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const [prefix, requestPath, resultPath] = process.argv.slice(2);
const pkgDir = join(prefix, "node_modules", "node-llama-cpp");
const version = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
const {getLlama, GgmlType, LlamaLogLevel} = await import(pathToFileURL(join(pkgDir, "dist", "index.js")).href);
const request = JSON.parse(readFileSync(requestPath, "utf8"));

const log = [];
const llama = await getLlama({
    gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true, progressLogs: false,
    maxThreads: request.threads, logLevel: LlamaLogLevel.warn,
    logger: (level, message) => log.push(`${level}: ${String(message).trim()}`),
});

function logprob(probabilities, token) {
    const p = probabilities.get(token);
    return p > 0 ? Math.log(p) : null;
}

async function scorePrompt(context, model, prompt) {
    const ids = model.tokenize(prompt.text, true);  // special tokens in the text (<|im_start|>) parsed, as HF does
    const idsPlain = model.tokenize(prompt.text, false);
    const sequence = context.getSequence();
    try {
        // teacher-forced: the distribution after each prompt token, read at the next prompt token
        const outputs = await sequence.controlledEvaluate(
            ids.map((token, i) => i + 1 < ids.length ? [token, {generateNext: {probabilities: true}}] : token));
        const promptLogprobs = [];
        for (let i = 0; i + 1 < ids.length; i++)
            promptLogprobs.push(logprob(outputs[i].next.probabilities, ids[i + 1]));
        await sequence.clearHistory();
        // greedy continuation: temperature 0 is llama.cpp's greedy sampler alone
        const greedy = [];
        const greedyLogprobs = [];
        const generator = sequence.evaluateWithMetadata(ids, {confidence: true}, {temperature: 0, yieldEogToken: true});
        for await (const out of generator) {
            greedy.push(out.token);
            greedyLogprobs.push(out.confidence > 0 ? Math.log(out.confidence) : null);
            if (greedy.length >= request.n_new || model.isSpecialToken(out.token))
                break;
        }
        return {name: prompt.name, ids: idsPlain, ids_special: ids, prompt_logprobs: promptLogprobs, greedy,
                greedy_logprobs: greedyLogprobs, greedy_text: model.detokenize(greedy)};
    } finally {
        sequence.dispose();
    }
}

async function checkFile(file) {
    const first = log.length;
    let model;
    try {
        model = await llama.loadModel({modelPath: file.path, gpuLayers: 0, useMmap: true});
    } catch (error) {
        return {label: file.label, loaded: false, error: String(error?.message ?? error), log: log.slice(first)};
    }
    try {
        const meta = model.fileInfo.metadata;
        const settings = {};
        for (const setting of request.settings) {
            // null: node-llama-cpp's default (F16 KV cache, flash attention "auto")
            const context = await model.createContext({
                contextSize: request.context, sequences: 1, threads: request.threads, batchSize: request.context,
                flashAttention: setting.flash_attention ?? undefined,
                experimentalKvCacheKeyType: setting.kv_cache ?? undefined,
                experimentalKvCacheValueType: setting.kv_cache ?? undefined});
            const prompts = [];
            for (const prompt of request.prompts)
                prompts.push(await scorePrompt(context, model, prompt));
            settings[setting.name] = {flash_attention: context.flashAttention, kv_cache_key: GgmlType[context.kvCacheKeyType],
                                      kv_cache_value: GgmlType[context.kvCacheValueType], prompts};
            await context.dispose();
        }
        return {label: file.label, loaded: true, log: log.slice(first),
                metadata: {architecture: meta?.general?.architecture, file_type: meta?.general?.file_type,
                           tokenizer_model: meta?.tokenizer?.ggml?.model, tokenizer_pre: meta?.tokenizer?.ggml?.pre,
                           vocabulary_type: model.vocabularyType, bos: model.tokens.bos, eos: model.tokens.eos,
                           prepends_bos: model.tokens.shouldPrependBosToken, train_context: model.trainContextSize},
                settings};
    } finally {
        await model.dispose();
    }
}

const files = [];
for (const file of request.files)
    files.push(await checkFile(file));
writeFileSync(resultPath, JSON.stringify({
    node_llama_cpp: version, node: process.version, llama_cpp: llama.llamaCppRelease, build_type: llama.buildType,
    gpu: llama.gpu, system_info: llama.systemInfo, files,
}, null, 1));
await llama.dispose();
