// tsm-edge's C++ runner: stream frames through a packaged artifact without Python.
//
// It loads the artifact's library with TVM's C++ runtime (libtvm_runtime.so and libtvm_ffi.so,
// bundled by `tsm-edge package --with-runtime`), carries the caches from frame to frame exactly
// as `tsm-edge run` does (each step's cache outputs are the next step's inputs; zeros at the
// start), writes the logits, and prints latency percentiles.
//
//   tsm-edge-run PACKAGE_DIR --frames FILE.npy [--raw] [--save-logits OUT.npy] [--frames-max N]
//                [--warmup N]
//
// FILE.npy holds (T, ...) frames of the artifact's input dtype and per-frame shape (float32
// (T, 3, S, S), or uint8 (T, S, S, 3) for an artifact compiled with --input uint8). With --raw,
// FILE is headerless: T frames of that dtype and shape, back to back.
//
// What it reads of the package: `runner/spec.txt`, written by `tsm-edge package` from the
// manifest (one record a line: `library NAME`, `entry NAME`, `input NAME DTYPE D0,D1,..`,
// `cache NAME DTYPE D0,..`, `output NAME DTYPE D0,..`), so the runner needs no JSON parser.
// Exit status: 0 done, 2 a user mistake (one `error:` line), 1 the runtime failed.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;
  int64_t elements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

struct Spec {
  std::string library, entry = "main";
  TensorSpec input, output;
  std::vector<TensorSpec> caches;
};

std::vector<int64_t> parse_dims(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

Spec read_spec(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw UserError(path + " does not exist: give the folder of an unpacked package");
  Spec spec;
  std::string line;
  bool have_input = false, have_output = false;
  while (std::getline(f, line)) {
    std::stringstream ls(line);
    std::string kind;
    ls >> kind;
    if (kind.empty() || kind[0] == '#') continue;
    if (kind == "library") {
      ls >> spec.library;
    } else if (kind == "entry") {
      ls >> spec.entry;
    } else if (kind == "input" || kind == "cache" || kind == "output") {
      TensorSpec t;
      std::string dims;
      ls >> t.name >> t.dtype >> dims;
      t.shape = parse_dims(dims);
      if (kind == "input") spec.input = t, have_input = true;
      if (kind == "output") spec.output = t, have_output = true;
      if (kind == "cache") spec.caches.push_back(t);
    }
  }
  if (spec.library.empty() || !have_input || !have_output)
    throw UserError(path + " lacks its library, input or output line: the package is damaged");
  return spec;
}

size_t dtype_bytes(const std::string& dtype) {
  DLDataType t = ffi::StringToDLDataType(dtype);
  return (t.bits * t.lanes + 7) / 8;
}

// The frames file: .npy (version 1-3 header) or raw; returns the bytes of every frame.
std::vector<char> read_frames(const std::string& path, bool raw, const TensorSpec& input,
                              int64_t* count) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw UserError("--frames " + path + " does not exist");
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t frame_bytes = input.elements() * dtype_bytes(input.dtype);
  size_t offset = 0;
  if (!raw) {
    if (data.size() < 10 || std::memcmp(data.data(), "\x93NUMPY", 6) != 0)
      throw UserError("--frames " + path + " is not a .npy file (give --raw for headerless "
                      "frames)");
    int major = static_cast<unsigned char>(data[6]);
    size_t hlen = major == 1 ? (static_cast<unsigned char>(data[8]) |
                                (static_cast<unsigned char>(data[9]) << 8))
                             : (static_cast<unsigned char>(data[8]) |
                                (static_cast<unsigned char>(data[9]) << 8) |
                                (static_cast<unsigned char>(data[10]) << 16) |
                                (static_cast<unsigned char>(data[11]) << 24));
    size_t start = major == 1 ? 10 : 12;
    std::string header(data.data() + start, std::min(hlen, data.size() - start));
    std::string want = input.dtype == "float32" ? "<f4" : input.dtype == "uint8" ? "|u1"
                       : input.dtype == "int8"  ? "|i1" : input.dtype == "float16" ? "<f2" : "?";
    if (header.find("'descr': '" + want + "'") == std::string::npos)
      throw UserError("--frames " + path + ": header " + header + " is not " + input.dtype +
                      " (" + want + "), the artifact's input dtype");
    if (header.find("'fortran_order': True") != std::string::npos)
      throw UserError("--frames " + path + " is Fortran-ordered; save it C-ordered");
    offset = start + hlen;
  }
  size_t body = data.size() - offset;
  if (frame_bytes == 0 || body % frame_bytes != 0 || body == 0)
    throw UserError("--frames " + path + " holds " + std::to_string(body) +
                    " bytes of frames, not a whole number of " + std::to_string(frame_bytes) +
                    "-byte " + input.dtype + " frames of the artifact's input shape");
  *count = static_cast<int64_t>(body / frame_bytes);
  return std::vector<char>(data.begin() + offset, data.end());
}

void write_npy(const std::string& path, const std::vector<float>& values, int64_t rows,
               int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(rows) + ", " + std::to_string(cols) + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw UserError("--save-logits " + path + ": cannot write there");
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t hlen = static_cast<uint16_t>(header.size());
    char len[2] = {static_cast<char>(hlen & 0xFF), static_cast<char>(hlen >> 8)};
    f.write(len, 2);
    f.write(header.data(), header.size());
    f.write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    if (!f) throw UserError("--save-logits " + path + ": the write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw UserError("--save-logits " + path + ": cannot move the file into place");
}

ffi::Tensor alloc(const TensorSpec& t, DLDevice dev) {
  static ffi::Function fn = *ffi::Function::GetGlobal("runtime.TVMTensorAllocWithScope");
  return fn(ffi::Shape(t.shape), ffi::StringToDLDataType(t.dtype), dev, ffi::Optional<ffi::String>())
      .cast<ffi::Tensor>();
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  double pos = q * (v.size() - 1);
  size_t lo = static_cast<size_t>(pos);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::printf("usage: %s PACKAGE_DIR --frames FILE.npy [--raw] [--save-logits OUT.npy] "
                "[--frames-max N] [--warmup N]\n", argv[0]);
    return argc < 2 ? 2 : 0;
  }
  std::string dir = argv[1], frames_path, logits_path;
  bool raw = false;
  int64_t max_frames = -1, warmup = 0;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const char* flag) {
      if (i + 1 >= argc) throw UserError(std::string(flag) + " needs a value");
      return std::string(argv[++i]);
    };
    auto number = [&](const char* flag) {
      std::string v = value(flag);
      char* end = nullptr;
      long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 0)
        throw UserError(std::string(flag) + " " + v + " is not valid; give a whole number >= 0");
      return static_cast<int64_t>(n);
    };
    if (a == "--frames") frames_path = value("--frames");
    else if (a == "--save-logits") logits_path = value("--save-logits");
    else if (a == "--raw") raw = true;
    else if (a == "--frames-max") max_frames = number("--frames-max");
    else if (a == "--warmup") warmup = number("--warmup");
    else throw UserError("unknown option " + a + "; valid: --frames, --raw, --save-logits, "
                         "--frames-max, --warmup");
  }
  if (frames_path.empty()) throw UserError("--frames FILE is required");
  Spec spec = read_spec(dir + "/runner/spec.txt");
  int64_t count = 0;
  std::vector<char> frames = read_frames(frames_path, raw, spec.input, &count);
  if (max_frames >= 0) count = std::min(count, max_frames);

  DLDevice cpu{kDLCPU, 0};
  ffi::Module lib = ffi::Module::LoadFromFile(dir + "/" + spec.library);
  // tsm-edge's parallel launcher, as the Python runtime installs it (TVM_NUM_THREADS threads,
  // else the runtime's default); absent from libraries built before it existed
  if (auto install = lib->GetFunction("tsm_edge_pool_install", true)) {
    static ffi::Function nthreads = *ffi::Function::GetGlobal("runtime.NumThreads");
    const char* env = std::getenv("TVM_NUM_THREADS");
    int threads = env && std::atoi(env) > 0 ? std::atoi(env) : nthreads().cast<int>();
    (*install)(threads, 4);
  }
  ffi::Module exec = (*lib->GetFunction("vm_load_executable", true))().cast<ffi::Module>();
  (*exec->GetFunction("vm_initialization", true))(static_cast<int>(kDLCPU), 0, 2);
  auto entry = exec->GetFunction(spec.entry, true);
  if (!entry) throw UserError(spec.library + " has no function " + spec.entry);
  ffi::Function main_fn = *entry;

  std::vector<ffi::Tensor> caches;
  for (const TensorSpec& c : spec.caches) {
    ffi::Tensor t = alloc(c, cpu);
    std::memset(t.data_ptr(), 0, c.elements() * dtype_bytes(c.dtype));
    caches.push_back(t);
  }
  ffi::Tensor input = alloc(spec.input, cpu);
  size_t frame_bytes = spec.input.elements() * dtype_bytes(spec.input.dtype);
  int64_t classes = spec.output.elements();
  if (spec.output.dtype != "float32") throw UserError("the runner writes float32 logits only");
  std::vector<float> logits(static_cast<size_t>(count * classes));
  std::vector<double> ms;
  std::vector<ffi::AnyView> args(1 + caches.size());
  for (int64_t i = 0; i < count; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(input.data_ptr(), frames.data() + i * frame_bytes, frame_bytes);
    args[0] = input;
    for (size_t k = 0; k < caches.size(); ++k) args[k + 1] = caches[k];
    ffi::Any ret;
    main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
    auto outs = ret.cast<ffi::Array<ffi::Any>>();
    ffi::Tensor out = outs[0].cast<ffi::Tensor>();
    std::memcpy(logits.data() + i * classes, out.data_ptr(), classes * sizeof(float));
    for (size_t k = 0; k < caches.size(); ++k) caches[k] = outs[k + 1].cast<ffi::Tensor>();
    auto t1 = std::chrono::steady_clock::now();
    if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  if (!logits_path.empty()) write_npy(logits_path, logits, count, classes);
  if (ms.empty()) {
    std::printf("%lld frames\n", static_cast<long long>(count));
  } else {
    std::printf("%lld frames  p50 %.2f ms  p90 %.2f ms  p99 %.2f ms\n",
                static_cast<long long>(count), percentile(ms, 0.5), percentile(ms, 0.9),
                percentile(ms, 0.99));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UserError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: the TVM runtime failed: %s\n", e.what());
    return 1;
  }
}
