// mage_generate: block-diffusion generation in pure C++ (LibTorch + the MAGE ops) from a
// checkpoint directory: text in (--prompt / --prompt-file, --chat for the Qwen ChatML template),
// text out on stdout, streamed block by block as each block is committed; or token ids in and
// out (--ids). Timings on stderr (and as JSON with --timing-json). See kUsage.
#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/base/io.h"
#include "runtime/base/json.h"
#include "runtime/base/tokenizer.h"
#include "runtime/generate.h"
#include "runtime/model.h"

#ifdef MAGE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {

using mage::runtime::BatchResult;
using mage::runtime::Json;
using mage::runtime::StepTime;
using mage::runtime::Tokenizer;

#ifdef MAGE_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

const char* kUsage =
    "usage: mage_generate --model DIR (--prompt TEXT | --prompt-file F | --ids ID,ID,... | --ids-file F)... [options]\n"
    "input (each repeatable: the prompts run as one batch; text and ids cannot be mixed):\n"
    "  --prompt TEXT              a text prompt (tokenized with DIR/tokenizer.json)\n"
    "  --prompt-file F            a text prompt read from a file (UTF-8)\n"
    "  --chat                     wrap each text prompt in the Qwen ChatML template:\n"
    "                             <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n\n"
    "  --ids ID,ID,...            a prompt of token ids; output is ids, one line per prompt\n"
    "  --ids-file F               prompts of token ids, one per line (for prompts too long for\n"
    "                             a command line)\n"
    "output: text on stdout, streamed as each block is committed (one prompt), or each prompt's\n"
    "  text followed by a line of dashes (a batch); special tokens are left out of the text.\n"
    "decoding (defaults as python -m mage_ext.generate):\n"
    "  --max-new-tokens N         (default 256)\n"
    "  --style fast_dllm|sdar     decoding loop (default: the checkpoint's family;\n"
    "                             qwen3/sdar -> sdar, qwen2/Fast_dLLM_Qwen -> fast_dllm)\n"
    "  --block-size N             (default: the checkpoint's bd_size)\n"
    "  --sub-block N / --threshold X     Fast-dLLM v2 decoding (default 8 / 0.9)\n"
    "  --steps N                  SDAR denoising steps per block, 1..block size (default 4)\n"
    "  --remasking low_confidence_static|low_confidence_dynamic   SDAR rule (default static;\n"
    "                             dynamic fills all positions above --threshold when >= n)\n"
    "  --temperature X            0 = greedy (default 0); > 0 samples\n"
    "  --top-p X                  nucleus sampling mass in (0, 1] (default 1)\n"
    "  --seed N                   sampling seed (default: random, printed on stderr)\n"
    "attention:\n"
    "  --policy exact|mage        (default mage)\n"
    "  --k N                      MAGE budget per layer and KV head (default 512)\n"
    "  --dense-layers N           first layers that always read the whole cache (default 2)\n"
    "  --n-sink N / --n-recent N  cache positions always kept (default 0)\n"
    "  --commit-attention sparse|exact   attention of the commit forward (default sparse)\n"
    "runtime:\n"
    "  --device cpu|cuda|cuda:N   (default cuda when this build has CUDA and a GPU is present)\n"
    "  --dtype float32|bfloat16|float16   (default bfloat16 on CUDA, float32 on the CPU)\n"
    "  --no-cuda-graphs           run every forward eagerly (CUDA)\n"
    "  --prefill-chunk N          prompt tokens per prefill forward, whole blocks (default 16384)\n"
    "  --threads N                intra-op CPU threads (default: LibTorch's)\n"
    "  --timing-json FILE         write load / prefill / per-forward timings and peak host memory\n"
    "  -h, --help\n";

// The mask token names load_model tries when config.json has no mask_token_id.
const char* kMaskTokenNames[] = {"|<MASK>|", "<|MASK|>", "<|mask|>", "<mask>", "[MASK]"};
const char* kChatTemplate[] = {"<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"};

[[noreturn]] void bad(const std::string& flag, const std::string& what) {
  throw std::invalid_argument(flag + ": " + what);
}

int64_t to_int(const std::string& flag, const std::string& v, int64_t lo = INT64_MIN) {
  int64_t n = 0;
  try {
    size_t used = 0;
    n = std::stoll(v, &used);
    if (used != v.size()) throw std::invalid_argument("");
  } catch (const std::exception&) {
    bad(flag, "expected an integer, got '" + v + "'");
  }
  if (n < lo) bad(flag, "must be >= " + std::to_string(lo) + ", got " + v);
  return n;
}

double to_double(const std::string& flag, const std::string& v) {
  double x = 0;
  try {
    size_t used = 0;
    x = std::stod(v, &used);
    if (used != v.size()) throw std::invalid_argument("");
  } catch (const std::exception&) {
    bad(flag, "expected a number, got '" + v + "'");
  }
  if (!std::isfinite(x)) bad(flag, "expected a finite number, got '" + v + "'");
  return x;
}

std::vector<int64_t> parse_ids(std::string s) {  // separated by commas and/or whitespace
  std::replace_if(s.begin(), s.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)); }, ',');
  std::vector<int64_t> ids;
  std::string tok;
  std::istringstream in(s);
  while (std::getline(in, tok, ','))
    if (!tok.empty()) ids.push_back(to_int("--ids", tok));
  if (ids.empty()) bad("--ids", "no token ids given");
  return ids;
}

// A named option's parse, its errors prefixed with the flag.
template <class T>
T parse_flag(const std::string& flag, const std::string& v, T (*parse)(const std::string&)) {
  try {
    return parse(v);
  } catch (const std::invalid_argument& e) {
    bad(flag, e.what());
  }
}

at::Device parse_device(const std::string& v) {
  if (v == "cpu") return at::Device(at::kCPU);
  if (v.rfind("cuda", 0) != 0) bad("--device", "expected cpu, cuda or cuda:N, got '" + v + "'");
  if (!kBuiltWithCuda)
    bad("--device", "this mage_generate was built without CUDA (configure with -DMAGE_WITH_CUDA=ON)");
  int64_t index = 0;
  if (v != "cuda") {
    if (v.size() < 6 || v[4] != ':') bad("--device", "expected cpu, cuda or cuda:N, got '" + v + "'");
    index = to_int("--device", v.substr(5), 0);
  }
  int64_t count = 0;
#ifdef MAGE_WITH_CUDA
  count = at::hasCUDA() ? c10::cuda::device_count() : 0;
#endif
  if (count == 0) bad("--device", "no CUDA device is available");
  if (index >= count)
    bad("--device", "cuda:" + std::to_string(index) + " does not exist (" + std::to_string(count) + " device(s))");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

double median(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int64_t status_kb(const std::string& field) {  // VmHWM (peak) or VmRSS (now), from /proc
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  return -1;
}

struct Summary {
  double prefill_device_s = 0, first_ms, later_ms, commit_ms, block_ms;
  size_t prefill_forwards = 0;
};

Summary summarize(const BatchResult& r) {
  std::map<StepTime::Kind, std::vector<double>> by;
  std::map<int64_t, double> block_s;  // per generation block: its forwards' device time
  std::set<int64_t> committed;
  Summary s;
  for (const auto& t : r.times) {
    by[t.kind].push_back(t.seconds * 1e3);
    if (t.kind == StepTime::Prefill) {
      s.prefill_device_s += t.seconds;
      ++s.prefill_forwards;
    } else {
      block_s[t.block] += t.seconds;
      if (t.kind == StepTime::Commit) committed.insert(t.block);
    }
  }
  std::vector<double> blocks;  // whole blocks only: denoising steps and the commit
  for (int64_t b : committed) blocks.push_back(block_s[b] * 1e3);
  s.first_ms = median(by[StepTime::FirstStep]);
  s.later_ms = median(by[StepTime::LaterStep]);
  s.commit_ms = median(by[StepTime::Commit]);
  s.block_ms = median(blocks);
  return s;
}

std::string ms(double v) {
  if (std::isnan(v)) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f ms", v);
  return buf;
}

Json nan_to_null(double v) { return std::isnan(v) ? Json(nullptr) : Json(v); }

std::string read_input_file(const std::string& flag, const std::string& path) {
  try {
    return mage::runtime::read_file(path);
  } catch (const std::exception& e) {
    bad(flag, e.what());
  }
}

int run(int argc, char** argv) {
  using Clock = std::chrono::steady_clock;
  static const std::set<std::string> kValued = {
      "--model", "--ids", "--prompt", "--prompt-file", "--policy", "--k", "--dense-layers",
      "--n-sink", "--n-recent", "--commit-attention", "--max-new-tokens", "--block-size", "--prefill-chunk",
      "--sub-block", "--threshold", "--dtype", "--device", "--threads", "--style", "--steps",
      "--remasking", "--temperature", "--top-p", "--seed", "--timing-json", "--ids-file"};
  static const std::set<std::string> kSwitches = {"--chat", "--no-cuda-graphs"};
  std::map<std::string, std::string> a;
  std::set<std::string> on;
  std::vector<std::vector<int64_t>> id_prompts;
  std::vector<std::string> text_prompts;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (kSwitches.count(flag)) {
      on.insert(flag);
      continue;
    }
    if (!kValued.count(flag)) throw std::invalid_argument("unknown argument '" + flag + "'");
    if (i + 1 >= argc) bad(flag, "missing value");
    const std::string v = argv[++i];
    a[flag] = v;
    if (flag == "--ids") id_prompts.push_back(parse_ids(v));
    if (flag == "--ids-file") {
      std::istringstream in(read_input_file("--ids-file", v));
      std::string line;
      size_t before = id_prompts.size();
      while (std::getline(in, line))
        if (line.find_first_not_of(" \t\r") != std::string::npos) id_prompts.push_back(parse_ids(line));
      if (id_prompts.size() == before) bad("--ids-file", v + ": no prompts in the file");
    }
    if (flag == "--prompt") text_prompts.push_back(v);
    if (flag == "--prompt-file") text_prompts.push_back(read_input_file(flag, v));
  }
  if (!a.count("--model")) throw std::invalid_argument("--model is required");
  if (id_prompts.empty() && text_prompts.empty())
    throw std::invalid_argument("give a prompt: --prompt, --prompt-file, --ids or --ids-file");
  if (!id_prompts.empty() && !text_prompts.empty())
    throw std::invalid_argument("--ids / --ids-file cannot be mixed with --prompt / --prompt-file");
  if (on.count("--chat") && text_prompts.empty()) bad("--chat", "applies to text prompts only");
  auto get = [&](const char* f, const char* def) { return a.count(f) ? a[f] : std::string(def); };

  mage::runtime::GenerateOptions o;
  o.policy.method = get("--policy", "mage");
  if (o.policy.method != "exact" && o.policy.method != "mage")
    bad("--policy", "expected exact or mage, got '" + o.policy.method + "'");
  o.policy.k = to_int("--k", get("--k", "512"), 1);
  o.policy.dense_layers = to_int("--dense-layers", get("--dense-layers", "2"), 0);
  o.policy.n_sink = to_int("--n-sink", get("--n-sink", "0"), 0);
  o.policy.n_recent = to_int("--n-recent", get("--n-recent", "0"), 0);
  const std::string commit = get("--commit-attention", "sparse");
  if (commit != "sparse" && commit != "exact") bad("--commit-attention", "expected sparse or exact, got '" + commit + "'");
  o.policy.commit_exact = commit == "exact";
  try {
    o.policy.validate();
  } catch (const std::invalid_argument& e) {
    bad("--n-sink/--n-recent/--k", e.what());
  }
  o.max_new_tokens = to_int("--max-new-tokens", get("--max-new-tokens", "256"), 1);
  o.block_size = to_int("--block-size", get("--block-size", "0"), 0);
  o.sub_block = to_int("--sub-block", get("--sub-block", "8"), 1);
  if (a.count("--style")) o.style = parse_flag("--style", a["--style"], mage::runtime::parse_style);
  o.steps = to_int("--steps", get("--steps", "4"));  // generate() checks it against the block
  o.remasking = parse_flag("--remasking", get("--remasking", "low_confidence_static"),
                           mage::runtime::parse_remasking);
  o.threshold = to_double("--threshold", get("--threshold", "0.9"));
  if (o.threshold < 0 || o.threshold > 1) bad("--threshold", "must lie in [0, 1]");
  o.temperature = to_double("--temperature", get("--temperature", "0"));
  if (o.temperature < 0) bad("--temperature", "must be >= 0");
  o.top_p = to_double("--top-p", get("--top-p", "1"));
  if (!(o.top_p > 0 && o.top_p <= 1)) bad("--top-p", "must lie in (0, 1]");
  if (a.count("--seed")) {
    o.seed = static_cast<uint64_t>(to_int("--seed", a["--seed"], 0));
  } else {
    o.seed = std::random_device{}();
    if (o.temperature > 0) std::fprintf(stderr, "mage_generate: sampling seed %llu\n",
                                        static_cast<unsigned long long>(o.seed));
  }
  o.cuda_graphs = !on.count("--no-cuda-graphs");
  o.prefill_chunk = to_int("--prefill-chunk",
                           get("--prefill-chunk", std::to_string(o.prefill_chunk).c_str()), 1);
  if (a.count("--threads")) at::set_num_threads(static_cast<int>(to_int("--threads", a["--threads"], 1)));
  const at::Device device = parse_device(
      get("--device", kBuiltWithCuda && at::hasCUDA() ? "cuda" : "cpu"));
  const std::string dtype = get("--dtype", device.is_cuda() ? "bfloat16" : "float32");
  const std::map<std::string, at::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"bfloat16", at::kBFloat16}, {"float16", at::kHalf}};
  if (!dtypes.count(dtype)) bad("--dtype", "expected float32, bfloat16 or float16, got '" + dtype + "'");
  const std::string timing_path = get("--timing-json", "");

  const std::string dir = a["--model"];
  if (device.is_cuda()) at::empty({1}, at::TensorOptions().device(device));  // the CUDA context
  std::ofstream("/proc/self/clear_refs") << "5";  // VmHWM := VmRSS (best effort): the load's own peak
  const int64_t rss_before_load_kb = status_kb("VmRSS");
  const auto t_load = Clock::now();
  auto model = mage::runtime::QwenModel::load(dir, dtypes.at(dtype), device);
  // The tokenizer: for text, and for the mask id when config.json has none (as load_model).
  const std::string tok_path = mage::runtime::join_path(dir, "tokenizer.json");
  std::unique_ptr<Tokenizer> tok;
  if (!text_prompts.empty() || model.config().mask_id < 0) {
    if (!mage::runtime::file_exists(tok_path))
      throw std::runtime_error(tok_path + ": missing (text prompts and a model without "
                               "mask_token_id need the tokenizer; --ids takes token ids)");
    tok = std::make_unique<Tokenizer>(Tokenizer::from_file(tok_path));
  }
  if (model.config().mask_id < 0) {
    for (const char* name : kMaskTokenNames)
      if (auto id = tok->token_to_id(name); id && o.mask_id < 0) o.mask_id = *id;
    if (o.mask_id < 0)
      throw std::runtime_error(dir + ": config.json has no mask_token_id and the tokenizer has no "
                               "mask token (|<MASK>|, <|MASK|>, <|mask|>, <mask>, [MASK])");
  }
  const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
  const int64_t load_peak_kb = status_kb("VmHWM");

  std::vector<std::vector<int64_t>> prompts = id_prompts;
  for (const std::string& text : text_prompts) {
    const std::string t = on.count("--chat") ? kChatTemplate[0] + text + kChatTemplate[1] : text;
    try {
      prompts.push_back(tok->encode(t));
    } catch (const std::exception& e) {
      throw std::invalid_argument(std::string("prompt: ") + e.what());
    }
    if (prompts.back().empty()) throw std::invalid_argument("prompt: the text encodes to no tokens");
  }

  // Text of a single prompt streams as blocks are committed.
  const bool stream = !text_prompts.empty() && prompts.size() == 1;
  std::unique_ptr<mage::runtime::TextStream> text_stream;
  if (stream) {
    text_stream = std::make_unique<mage::runtime::TextStream>(*tok);
    o.on_block = [&](const std::vector<std::vector<int64_t>>& added) {
      std::cout << text_stream->push(added[0]) << std::flush;
    };
  }
  const auto t_gen = Clock::now();
  BatchResult result = mage::runtime::generate_batch(model, prompts, o);
  const double gen_s = std::chrono::duration<double>(Clock::now() - t_gen).count();
  if (stream) {
    std::cout << text_stream->finish() << "\n";
  } else {
    for (const auto& tokens : result.tokens) {
      if (tok && !text_prompts.empty()) {
        std::cout << tok->decode(tokens) << "\n" << std::string(40, '-') << "\n";
      } else {
        for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
        std::cout << "\n";
      }
    }
  }
  std::cout << std::flush;

  const Summary s = summarize(result);
  size_t generated = 0;
  for (const auto& t : result.tokens) generated += t.size();
  std::fprintf(stderr,
               "prefill %.2f ms (%zu forwards); steps: first %s, later %s (median); commit %s; "
               "block %s; KV read %.3f; %zu tokens in %.2f s\n",
               result.prefill_wall_s * 1e3, s.prefill_forwards, ms(s.first_ms).c_str(),
               ms(s.later_ms).c_str(), ms(s.commit_ms).c_str(), ms(s.block_ms).c_str(),
               result.kv_fraction, generated, gen_s);
  if (!timing_path.empty()) {
    Json forwards = Json::array();
    const char* names[] = {"prefill", "first", "later", "commit"};
    for (const auto& t : result.times)
      if (t.kind != StepTime::Prefill)
        forwards.push_back({{"kind", names[t.kind]}, {"block", t.block},
                            {"device_ms", t.seconds * 1e3}, {"host_ms", t.host_seconds * 1e3}});
    std::vector<size_t> lengths;
    for (const auto& p : prompts) lengths.push_back(p.size());
    Json j = {{"runtime", "cpp"}, {"device", device.str()}, {"dtype", dtype},
              {"batch", prompts.size()}, {"prompt_tokens", lengths},
              {"policy", o.policy.method}, {"k", o.policy.k}, {"graphs", o.cuda_graphs && device.is_cuda()},
              {"load_s", load_s}, {"host_rss_before_load_kb", rss_before_load_kb},
              {"host_peak_load_kb", load_peak_kb}, {"host_peak_kb", status_kb("VmHWM")},
              {"prefill_s", result.prefill_wall_s}, {"prefill_device_s", s.prefill_device_s},
              {"prefill_forwards", s.prefill_forwards},
              {"first_ms", nan_to_null(s.first_ms)}, {"later_ms", nan_to_null(s.later_ms)},
              {"commit_ms", nan_to_null(s.commit_ms)}, {"block_ms", nan_to_null(s.block_ms)},
              {"decode_s", result.decode_wall_s}, {"tokens", generated},
              {"tokens_per_s", result.decode_wall_s > 0 ? generated / result.decode_wall_s : 0.0},
              {"kv_fraction", result.kv_fraction}, {"forwards", forwards}};
    std::ofstream f(timing_path);
    f << j.dump(1) << "\n";
    if (!f) throw std::runtime_error(timing_path + ": cannot write the timing JSON");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::cerr << "mage_generate: " << e.what() << " (see --help)\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "mage_generate: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mage_generate: " << e.what() << "\n";
    return 1;
  }
}
