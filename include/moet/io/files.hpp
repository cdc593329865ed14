// Reading and writing the files moet exchanges (config.json, adapter_config.json, index files,
// safetensors headers) without letting a hostile or mistaken input escape as anything but a
// moet::format_error:
//   - JSON nesting is bounded (max_json_depth) while parsing, so a few hundred kilobytes of
//     brackets cannot overflow the stack in the parser or in the recursive copies, comparisons
//     and dumps that follow;
//   - a path that is a directory, unreadable, or not a regular file is named as such, instead of
//     escaping as std::ios_base::failure or std::filesystem::filesystem_error;
//   - saving under a path that exists as a regular file is refused by name.
#pragma once

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"

namespace moet {

/// A file is missing, unreadable, corrupt, or does not hold what the model needs.
class format_error : public error {
 public:
  using error::error;
};

namespace io {

/// The deepest nesting of objects and arrays moet accepts in a JSON file. Its own files nest
/// four deep, Hugging Face's config.json files three; 64 leaves room and bounds the recursion.
inline constexpr int max_json_depth = 64;

/// Parses JSON text ([first, last) of chars or bytes) into Json (nlohmann::json or
/// ordered_json), refusing malformed text and nesting deeper than max_json_depth with a
/// moet::format_error that starts with `who`.
template <class Json = nlohmann::json, class Iterator>
Json parse_json(Iterator first, Iterator last, const std::string& who) {
  const auto depth_guard = [&](int depth, nlohmann::detail::parse_event_t event, Json&) {
    if ((event == nlohmann::detail::parse_event_t::object_start || event == nlohmann::detail::parse_event_t::array_start) &&
        depth >= max_json_depth)
      throw format_error(detail::concat(who, ": JSON nested deeper than ", max_json_depth, " levels"));
    return true;
  };
  try {
    return Json::parse(first, last, depth_guard);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(who + ": malformed JSON: " + e.what());
  }
}
template <class Json = nlohmann::json>
Json parse_json(const std::string& text, const std::string& who) {
  return parse_json<Json>(text.begin(), text.end(), who);
}

/// The whole of a regular file as text; a missing file, a directory or a read error is a
/// moet::format_error starting with `who`.
inline std::string read_text_file(const std::filesystem::path& path, const std::string& who) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) throw format_error(who + ": cannot open " + path.string() + ": no such file");
  if (!std::filesystem::is_regular_file(status))
    throw format_error(who + ": " + path.string() + " is " +
                       (std::filesystem::is_directory(status) ? "a directory" : "not a regular file") + ", expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error(who + ": cannot open " + path.string() + ": " + std::strerror(errno));
  try {
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  } catch (const std::exception& e) {
    throw format_error(who + ": cannot read " + path.string() + ": " + e.what());
  }
}

/// Makes `dir` (and its parents) a directory to write into; a path that exists as something
/// else, or cannot be made, is a moet::format_error starting with `who`.
inline void make_directory(const std::filesystem::path& dir, const std::string& who) {
  std::error_code ec;
  const auto status = std::filesystem::status(dir, ec);
  if (std::filesystem::exists(status) && !std::filesystem::is_directory(status))
    throw format_error(who + ": cannot save into " + dir.string() + ": it exists and is not a directory");
  std::filesystem::create_directories(dir, ec);
  if (ec) throw format_error(who + ": cannot make the directory " + dir.string() + ": " + ec.message());
}

/// Writes `text` to `path` (replacing it); any failure is a moet::format_error.
inline void write_text_file(const std::filesystem::path& path, const std::string& text, const std::string& who) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw format_error(who + ": cannot write " + path.string() + ": " + std::strerror(errno));
  out << text;
  out.flush();
  if (!out) throw format_error(who + ": failed writing " + path.string());
}

}  // namespace io
}  // namespace moet
