// mage_generate: greedy block-diffusion generation from token ids with a checkpoint directory,
// in pure C++ (LibTorch + the MAGE ops). Prints the generated ids on stdout, one line per
// prompt (--ids may repeat: the prompts run as one batch), timings on stderr.
//
//   mage_generate --model DIR --ids 5,17,42 [--ids 7,8 ...] [--policy exact|mage] [--k 512] [--dense-layers 2]
//                 [--max-new-tokens 32] [--threads N] [--dtype float32|bfloat16]
//                 [--style fast_dllm|sdar] [--steps 4] [--remasking low_confidence_static]
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/generate.h"
#include "runtime/model.h"

namespace {

using mage::runtime::StepTime;

const char* kUsage =
    "usage: mage_generate --model DIR --ids ID,ID,... [--ids ID,... ...] [options]\n"
    "  --ids ID,ID,...            a prompt; repeat for a batch (one output line each)\n"
    "  --policy exact|mage        attention policy (default mage)\n"
    "  --k N                      MAGE budget per layer and KV head (default 512)\n"
    "  --dense-layers N           first layers that always read the whole cache (default 2)\n"
    "  --n-sink N / --n-recent N  cache positions always kept (default 0)\n"
    "  --commit-attention sparse|exact   attention of the commit forward (default sparse)\n"
    "  --max-new-tokens N         (default 32)\n"
    "  --block-size N             (default: the checkpoint's bd_size)\n"
    "  --style fast_dllm|sdar     decoding loop (default: the checkpoint's family;\n"
    "                             qwen3/sdar -> sdar, qwen2/Fast_dLLM_Qwen -> fast_dllm)\n"
    "  --sub-block N / --threshold X     Fast-dLLM v2 decoding (default 8 / 0.9)\n"
    "  --steps N                  SDAR denoising steps per block, 1..block size (default 4)\n"
    "  --remasking low_confidence_static|low_confidence_dynamic   SDAR rule (default static;\n"
    "                             dynamic fills all positions above --threshold when >= n)\n"
    "  --dtype float32|bfloat16   compute dtype (default float32)\n"
    "  --threads N                intra-op CPU threads (default: LibTorch's)\n";

int64_t to_int(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    long long n = std::stoll(v, &used);
    if (used == v.size()) return n;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument(flag + ": expected an integer, got '" + v + "'");
}

std::vector<int64_t> parse_ids(const std::string& s) {
  std::vector<int64_t> ids;
  std::string tok;
  std::istringstream in(s);
  while (std::getline(in, tok, ',')) {
    tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
    if (!tok.empty()) ids.push_back(to_int("--ids", tok));
  }
  if (ids.empty()) throw std::invalid_argument("--ids: no token ids given");
  return ids;
}

// A named option's parse, its errors prefixed with the flag.
template <class T>
T parse_flag(const std::string& flag, const std::string& v, T (*parse)(const std::string&)) {
  try {
    return parse(v);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(flag + ": " + e.what());
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void report_times(const mage::runtime::BatchResult& r) {
  std::map<StepTime::Kind, std::vector<double>> by;
  for (const auto& t : r.times) by[t.kind].push_back(t.seconds);
  double prefill = 0;
  for (double s : by[StepTime::Prefill]) prefill += s;
  auto ms = [&](StepTime::Kind k) {
    if (by[k].empty()) return std::string("n/a");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f ms", median(by[k]) * 1e3);
    return std::string(buf);
  };
  std::fprintf(stderr,
               "prefill %.2f ms (%zu blocks); steps: first %s, later %s (median); commit %s; "
               "KV read %.3f\n",
               prefill * 1e3, by[StepTime::Prefill].size(), ms(StepTime::FirstStep).c_str(),
               ms(StepTime::LaterStep).c_str(), ms(StepTime::Commit).c_str(), r.kv_fraction);
}

int run(int argc, char** argv) {
  std::map<std::string, std::string> a;
  std::vector<std::vector<int64_t>> prompts;  // one per --ids, in order
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      return 0;
    }
    static const char* known[] = {"--model", "--ids", "--policy", "--k", "--dense-layers",
                                  "--n-sink", "--n-recent", "--commit-attention",
                                  "--max-new-tokens", "--block-size", "--sub-block",
                                  "--threshold", "--dtype", "--threads", "--style", "--steps",
                                  "--remasking"};
    if (std::find(std::begin(known), std::end(known), flag) == std::end(known))
      throw std::invalid_argument("unknown argument '" + flag + "'");
    if (i + 1 >= argc) throw std::invalid_argument(flag + ": missing value");
    a[flag] = argv[++i];
    if (flag == "--ids") prompts.push_back(parse_ids(a[flag]));
  }
  if (!a.count("--model") || !a.count("--ids"))
    throw std::invalid_argument("--model and --ids are required");
  auto get = [&](const char* f, const char* def) { return a.count(f) ? a[f] : std::string(def); };

  mage::runtime::GenerateOptions o;
  o.policy.method = get("--policy", "mage");
  o.policy.k = to_int("--k", get("--k", "512"));
  o.policy.dense_layers = to_int("--dense-layers", get("--dense-layers", "2"));
  o.policy.n_sink = to_int("--n-sink", get("--n-sink", "0"));
  o.policy.n_recent = to_int("--n-recent", get("--n-recent", "0"));
  const std::string commit = get("--commit-attention", "sparse");
  if (commit != "sparse" && commit != "exact")
    throw std::invalid_argument("--commit-attention: expected sparse or exact, got '" + commit + "'");
  o.policy.commit_exact = commit == "exact";
  o.policy.validate();
  o.max_new_tokens = to_int("--max-new-tokens", get("--max-new-tokens", "32"));
  o.block_size = to_int("--block-size", get("--block-size", "0"));
  o.sub_block = to_int("--sub-block", get("--sub-block", "8"));
  if (a.count("--style")) o.style = parse_flag("--style", a["--style"], mage::runtime::parse_style);
  o.steps = to_int("--steps", get("--steps", "4"));
  o.remasking = parse_flag("--remasking", get("--remasking", "low_confidence_static"),
                           mage::runtime::parse_remasking);
  try {
    o.threshold = std::stod(get("--threshold", "0.9"));
  } catch (const std::exception&) {
    throw std::invalid_argument("--threshold: expected a number");
  }
  const std::string dtype = get("--dtype", "float32");
  if (dtype != "float32" && dtype != "bfloat16")
    throw std::invalid_argument("--dtype: expected float32 or bfloat16, got '" + dtype + "'");
  if (a.count("--threads")) {
    const int64_t t = to_int("--threads", a["--threads"]);
    if (t <= 0) throw std::invalid_argument("--threads: must be > 0");
    at::set_num_threads(static_cast<int>(t));
  }

  auto model = mage::runtime::QwenModel::load(a["--model"],
                                              dtype == "float32" ? at::kFloat : at::kBFloat16);
  auto result = mage::runtime::generate_batch(model, prompts, o);
  for (const auto& tokens : result.tokens) {
    for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
    std::cout << "\n";
  }
  std::cout << std::flush;
  report_times(result);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::cerr << "mage_generate: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "mage_generate: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mage_generate: " << e.what() << "\n";
    return 1;
  }
}
