// `micromix tokenize`: token ids of a text with the model's tokenizer.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "common.h"
#include "micromix/common/io.h"
#include "micromix/model/loader.h"

namespace micromix::cli {
namespace {

int run_tokenize(const ParsedArgs& args) {
  if (args.given("text") == args.given("file")) throw UsageError("give exactly one of --text TEXT or --file FILE");
  const std::string text = args.given("text") ? args.str("text") : read_file(args.str("file"));
  const std::string path = args.given("model") ? args.str("model") : model::default_model_path();
  const model::Tokenizer tok = model::load_tokenizer(path);
  const auto ids = tok.encode(text, args.flag("add-special"));
  if (args.flag("json")) {
    nlohmann::json pieces = nlohmann::json::array();
    for (int32_t id : ids) pieces.push_back(tok.token_text(id));
    std::cout << json_text(nlohmann::json{{"ids", ids}, {"tokens", pieces}, {"count", ids.size()}}, -1) << "\n";
    return 0;
  }
  for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? " " : "", ids[i]);
  std::printf("\n");
  return 0;
}

const RegisterCommand register_tokenize({"tokenize", "print the token ids of a text",
                                         "[--model M] (--text TEXT | --file FILE) [--add-special] [--json]", "",
                                         {{"model", "FILE", "", "model file whose tokenizer to use"},
                                          {"text", "TEXT", "", "text to tokenize"},
                                          {"file", "FILE", "", "file to tokenize"},
                                          {"add-special", "", "", "add BOS/EOS as the tokenizer asks"},
                                          {"json", "", "", "print ids and token strings as JSON"}},
                                         run_tokenize});

}  // namespace
}  // namespace micromix::cli
