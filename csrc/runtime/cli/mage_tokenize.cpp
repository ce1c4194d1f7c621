// mage_tokenize: the runtime's tokenizer on its own (no LibTorch), for checking a tokenizer.json
// against the Python `tokenizers` library. Reads JSON lines on stdin and answers one line each:
//   {"text": "..."}                 -> {"ids": [...], "text": decode(ids), "text_all": decode(ids, keep specials)}
//   {"ids": [...], "chunk": N}      -> {"text": ..., "text_all": ..., "stream": TextStream over chunks of N ids}
// An input the tokenizer refuses (e.g. invalid UTF-8) answers {"error": "..."}.
//
//   mage_tokenize --tokenizer DIR/tokenizer.json < requests.jsonl
#include <iostream>
#include <string>

#include "runtime/base/json.h"
#include "runtime/base/tokenizer.h"

using mage::runtime::Json;
using mage::runtime::TextStream;
using mage::runtime::Tokenizer;

namespace {

Json answer(const Tokenizer& tok, const Json& req) {
  Json out;
  std::vector<int64_t> ids;
  if (const Json* text = mage::runtime::find(req, "text")) {
    ids = tok.encode(mage::runtime::as_string(*text, "text"));
    out["ids"] = ids;
  } else if (const Json* given = mage::runtime::find(req, "ids")) {
    for (const Json& i : *given) ids.push_back(mage::runtime::as_int(i, "ids"));
    const Json* chunk = mage::runtime::find(req, "chunk");
    const size_t n = chunk ? static_cast<size_t>(mage::runtime::as_int(*chunk, "chunk")) : 1;
    TextStream stream(tok);
    std::string streamed;
    for (size_t i = 0; i < ids.size(); i += n)
      streamed += stream.push(std::vector<int64_t>(ids.begin() + i, ids.begin() + std::min(ids.size(), i + n)));
    out["stream"] = streamed + stream.finish();
  } else {
    throw std::runtime_error("a request needs \"text\" or \"ids\"");
  }
  out["text"] = tok.decode(ids, true);
  out["text_all"] = tok.decode(ids, false);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) != "--tokenizer") {
    std::cerr << "usage: mage_tokenize --tokenizer FILE < requests.jsonl\n";
    return 2;
  }
  try {
    const Tokenizer tok = Tokenizer::from_file(argv[2]);
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line.empty()) continue;
      Json out;
      try {
        out = answer(tok, mage::runtime::parse_json(line, "request"));
      } catch (const std::exception& e) {
        out = Json{{"error", e.what()}};
      }
      std::cout << out.dump(-1, ' ', /*ensure_ascii=*/true, Json::error_handler_t::replace) << "\n" << std::flush;
    }
  } catch (const std::exception& e) {
    std::cerr << "mage_tokenize: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
