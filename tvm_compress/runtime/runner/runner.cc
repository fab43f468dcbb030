// tvm-compress runner: runs a compiled model library (Relax VM executable) without Python.
//
//   runner run --model model.so --input x.npy [--input y.npy ...] [--output-dir DIR]
//              [--repeat N] [--warmup W] [--threads T]
//   runner rpc [--host 0.0.0.0] [--port 9090] [--tracker HOST:PORT] [--key KEY]
//              [--work-dir DIR] [--sessions N]
//
// `run` reads the inputs from .npy files, writes every output as DIR/output_<i>.npy and prints one
// JSON line (output shapes, per-run milliseconds, median, threads). `rpc` is a TVM RPC server (the protocol
// of tvm.rpc: handshake, optional tracker registration, then the runtime's rpc.ServerLoop), so a
// device without Python can be measured from a host with `tvm-compress bench --rpc/--tracker`.
// Built from the same source for the host (x86_64) and, with the toolchain file, for aarch64.

#include <arpa/inet.h>
#include <sched.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace ffi = tvm::ffi;

namespace {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------------------ npy

struct NpyType {
  const char* descr;
  DLDataType dtype;
};

const NpyType kNpyTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"<i4", {kDLInt, 32, 1}},   {"<i8", {kDLInt, 64, 1}},   {"|b1", {kDLBool, 8, 1}},
};

bool SameType(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, std::max<size_t>(64, (n + 63) / 64 * 64));
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw Error("npy header has no '" + key + "': " + header);
  at = header.find(':', at);
  size_t end = key == "shape" ? header.find(')', at) + 1 : header.find_first_of(",}", at);
  std::string value = header.substr(at + 1, end - at - 1);
  value.erase(0, value.find_first_not_of(" "));
  return value;
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open input " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw Error(path + " is not an .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  std::string descr = HeaderValue(header, "descr");
  descr = descr.substr(1, descr.size() - 2);
  if (HeaderValue(header, "fortran_order").rfind("False", 0) != 0) {
    throw Error(path + ": Fortran-ordered arrays are not supported (save with np.ascontiguousarray)");
  }
  const NpyType* type = nullptr;
  for (const auto& t : kNpyTypes) {
    if (descr == t.descr) type = &t;
  }
  if (type == nullptr) throw Error(path + ": unsupported dtype " + descr);
  std::string shape_text = HeaderValue(header, "shape");
  std::vector<int64_t> shape;
  std::stringstream ss(shape_text.substr(1, shape_text.size() - 2));
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.find_first_not_of(" ") != std::string::npos) shape.push_back(std::stoll(item));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           type->dtype, DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  in.read(static_cast<char*>(t.GetDLTensorPtr()->data), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes) throw Error(path + ": truncated data");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU) throw Error("output is not on the CPU");
  const NpyType* type = nullptr;
  for (const auto& nt : kNpyTypes) {
    if (SameType(nt.dtype, dl->dtype)) type = &nt;
  }
  if (type == nullptr) throw Error("output has a dtype .npy cannot hold");
  std::string shape = "(";
  for (int i = 0; i < dl->ndim; ++i) {
    shape += std::to_string(dl->shape[i]) + (dl->ndim == 1 ? "," : (i + 1 < dl->ndim ? ", " : ""));
  }
  shape += ")";
  std::string header = std::string("{'descr': '") + type->descr +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) throw Error("cannot write " + path);
  out.write("\x93NUMPY\x01\x00", 8);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&len), 2);
  out << header;
  out.write(static_cast<const char*>(dl->data) + dl->byte_offset,
            static_cast<std::streamsize>(ffi::GetDataSize(*dl)));
}

void CollectTensors(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) CollectTensors(item, out);
  } else {
    throw Error("model output is neither a tensor nor a tuple of tensors");
  }
}

// ------------------------------------------------------------------------------------------ run

using Args = std::multimap<std::string, std::string>;

std::string Get(const Args& args, const std::string& key, const std::string& fallback) {
  auto it = args.find(key);
  return it == args.end() ? fallback : it->second;
}

int CmdRun(const Args& args) {
  std::string model = Get(args, "--model", "model.so");
  std::string out_dir = Get(args, "--output-dir", "");
  int repeat = std::stoi(Get(args, "--repeat", "0"));
  int warmup = std::stoi(Get(args, "--warmup", repeat > 0 ? "2" : "0"));
  std::vector<ffi::Any> inputs;
  for (auto [it, end] = args.equal_range("--input"); it != end; ++it) {
    inputs.push_back(ReadNpy(it->second));
  }
  if (inputs.empty()) throw Error("give at least one --input FILE.npy");

  // dlopen looks a bare file name up on the library search path, not in the current directory:
  // `--model model.so` (as the bundle README writes it) means the file here.
  if (model.find('/') == std::string::npos) model = "./" + model;
  ffi::Module lib = ffi::Module::LoadFromFile(model);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // device type, device id, allocator (2: pooled) - the same as relax.VirtualMachine on a CPU.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main = vm->GetFunction("main").value();

  std::vector<ffi::AnyView> views(inputs.begin(), inputs.end());
  auto call = [&]() {
    ffi::Any rv;
    main.CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
    return rv;
  };
  ffi::Any result = call();
  std::vector<ffi::Tensor> outputs;
  CollectTensors(result, &outputs);
  std::string shapes;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const DLTensor* dl = outputs[i].GetDLTensorPtr();
    shapes += (i ? ", [" : "[");
    for (int d = 0; d < dl->ndim; ++d) shapes += (d ? ", " : "") + std::to_string(dl->shape[d]);
    shapes += "]";
    if (!out_dir.empty()) {
      mkdir(out_dir.c_str(), 0755);
      WriteNpy(out_dir + "/output_" + std::to_string(i) + ".npy", outputs[i]);
    }
  }
  for (int i = 0; i < warmup; ++i) call();
  std::vector<double> ms;
  for (int i = 0; i < repeat; ++i) {
    auto start = std::chrono::steady_clock::now();
    call();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
  }
  std::ostringstream json;
  json << "{\"outputs\": [" << shapes << "], \"runs_ms\": [";
  for (size_t i = 0; i < ms.size(); ++i) json << (i ? ", " : "") << ms[i];
  json << "]";
  const char* threads = getenv("TVM_NUM_THREADS");  // set by main() before the pool starts
  if (threads != nullptr) json << ", \"threads\": " << std::atoi(threads);
  if (!ms.empty()) {
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    size_t n = sorted.size();
    double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    json << ", \"median_ms\": " << median << ", \"min_ms\": " << sorted.front();
  }
  json << "}";
  std::cout << json.str() << std::endl;
  return 0;
}

// ------------------------------------------------------------------------------------------ rpc

constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kTrackerMagic = 0x2F271;
constexpr int kTrackerSuccess = 0, kTrackerPut = 3, kTrackerUpdateInfo = 5, kTrackerPending = 7;

void SendAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) throw Error("socket send failed");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void RecvAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t k = recv(fd, p, n, 0);
    if (k <= 0) throw Error("socket closed");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void SendInt(int fd, int32_t v) { SendAll(fd, &v, 4); }
int32_t RecvInt(int fd) {
  int32_t v;
  RecvAll(fd, &v, 4);
  return v;
}
void SendStr(int fd, const std::string& s) {
  SendInt(fd, static_cast<int32_t>(s.size()));
  SendAll(fd, s.data(), s.size());
}
std::string RecvStr(int fd) {
  int32_t n = RecvInt(fd);
  if (n < 0 || n > (1 << 20)) throw Error("bad message length");
  std::string s(static_cast<size_t>(n), '\0');
  RecvAll(fd, s.data(), s.size());
  return s;
}

int Connect(const std::string& host, int port) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) {
    throw Error("cannot resolve " + host);
  }
  int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  int rc = connect(fd, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  if (rc != 0) {
    close(fd);
    throw Error("cannot connect to " + host + ":" + std::to_string(port));
  }
  return fd;
}

class Tracker {
 public:
  Tracker(const std::string& addr, const std::string& key, int port) : key_(key), port_(port) {
    size_t colon = addr.rfind(':');
    if (colon == std::string::npos) throw Error("--tracker must be HOST:PORT, got " + addr);
    for (int attempt = 0;; ++attempt) {
      try {
        fd_ = Connect(addr.substr(0, colon), std::stoi(addr.substr(colon + 1)));
        break;
      } catch (const Error&) {
        if (attempt >= 20) throw;
        sleep(1);
      }
    }
    SendInt(fd_, kTrackerMagic);
    if (RecvInt(fd_) != kTrackerMagic) throw Error(addr + " is not a TVM RPC tracker");
    Expect(Call("[" + std::to_string(kTrackerUpdateInfo) + ", {\"key\": \"server:" + key_ +
                "\", \"addr\": [null, " + std::to_string(port_) + "]}]"));
  }
  ~Tracker() { close(fd_); }

  // Offers this server under a fresh match key; clients get it from the tracker.
  std::string Put() {
    static std::mt19937 rng(std::random_device{}());
    matchkey_ = key_ + ":" + std::to_string(rng() % 100000000);
    Expect(Call("[" + std::to_string(kTrackerPut) + ", \"" + key_ + "\", [" +
                std::to_string(port_) + ", \"" + matchkey_ + "\"], null]"));
    return matchkey_;
  }

  bool Pending() {
    return Call("[" + std::to_string(kTrackerPending) + "]").find("\"" + matchkey_ + "\"") !=
           std::string::npos;
  }

 private:
  std::string Call(const std::string& json) {
    SendStr(fd_, json);
    return RecvStr(fd_);
  }
  static void Expect(const std::string& reply) {
    if (reply != std::to_string(kTrackerSuccess)) throw Error("tracker refused: " + reply);
  }
  int fd_ = -1;
  std::string key_, matchkey_;
  int port_;
};

std::string MakeWorkDir(const std::string& requested) {
  if (!requested.empty()) {
    mkdir(requested.c_str(), 0755);
    return requested;
  }
  char templ[] = "/tmp/tvm-compress-rpc-XXXXXX";
  if (mkdtemp(templ) == nullptr) throw Error("cannot create a work directory in /tmp");
  return templ;
}

int CmdRpc(const Args& args) {
  std::string host = Get(args, "--host", "0.0.0.0");
  int port = std::stoi(Get(args, "--port", "9090"));
  std::string key = Get(args, "--key", "");
  std::string tracker_addr = Get(args, "--tracker", "");
  int sessions = std::stoi(Get(args, "--sessions", "0"));  // 0: serve forever
  std::string work_dir = MakeWorkDir(Get(args, "--work-dir", ""));

  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped(
      [work_dir](ffi::String name) { return ffi::String(work_dir + "/" + std::string(name)); }),
      true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped(
      [work_dir](ffi::String name) {
        return ffi::Module::LoadFromFile(work_dir + "/" + std::string(name));
      }), true);
  ffi::Function server_loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");

  int listen_fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) throw Error("bad --host " + host);
  if (bind(listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listen_fd, 4) != 0) {
    throw Error("cannot listen on " + host + ":" + std::to_string(port));
  }
  std::unique_ptr<Tracker> tracker;
  if (!tracker_addr.empty()) tracker = std::make_unique<Tracker>(tracker_addr, key, port);
  std::cerr << "rpc server listening on " << host << ":" << port << " key '" << key << "'"
            << (tracker ? " tracker " + tracker_addr : "") << " work dir " << work_dir
            << std::endl;

  for (int served = 0; sessions == 0 || served < sessions;) {
    std::string matchkey = tracker ? tracker->Put() : key;
    int unmatched_polls = 0;
    int conn = -1;
    while (conn < 0) {
      if (tracker) {  // ping the tracker while idle; renew a key taken but never used
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(listen_fd, &fds);
        timeval tv{2, 0};
        if (select(listen_fd + 1, &fds, nullptr, nullptr, &tv) <= 0) {
          unmatched_polls = tracker->Pending() ? 0 : unmatched_polls + 1;
          if (unmatched_polls > 3) {
            matchkey = tracker->Put();
            unmatched_polls = 0;
          }
          continue;
        }
      }
      conn = accept(listen_fd, nullptr, nullptr);
      if (conn < 0) continue;
      try {
        if (RecvInt(conn) != kRPCMagic) throw Error("not a TVM RPC client");
        std::string client_key = RecvStr(conn);
        std::string first = client_key.substr(0, client_key.find(' '));
        if (first != "client:" + matchkey) {
          SendInt(conn, kRPCMagic + 2);  // RPC_CODE_MISMATCH
          throw Error("key mismatch: " + first);
        }
        SendInt(conn, kRPCMagic);  // RPC_CODE_SUCCESS
        SendStr(conn, "server:" + key);
      } catch (const Error& e) {
        std::cerr << "rejected a connection: " << e.what() << std::endl;
        close(conn);
        conn = -1;
      }
    }
    std::cerr << "session " << served << " started" << std::endl;
    try {
      server_loop(conn);
    } catch (const std::exception& e) {
      std::cerr << "session " << served << " ended with an error: " << e.what() << std::endl;
    }
    close(conn);
    ++served;
    std::cerr << "session " << served - 1 << " finished" << std::endl;
  }
  close(listen_fd);
  return 0;
}

void Usage() {
  std::cerr << "usage:\n"
               "  runner run --model model.so --input x.npy [--input ...] [--output-dir DIR]\n"
               "             [--repeat N] [--warmup W] [--threads T]\n"
               "  runner rpc [--host 0.0.0.0] [--port 9090] [--tracker HOST:PORT] [--key KEY]\n"
               "             [--work-dir DIR] [--sessions N]\n";
}

// CPUs this process may run on (its affinity mask), at least 1.
int UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? static_cast<int>(online) : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || (std::string(argv[1]) != "run" && std::string(argv[1]) != "rpc")) {
    Usage();
    return 2;
  }
  Args args;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || i + 1 >= argc) {
      std::cerr << "error: expected --flag VALUE, got '" << a << "'\n";
      Usage();
      return 2;
    }
    args.emplace(a, argv[++i]);
  }
  // TVM starts hardware_concurrency / 2 workers on x86 (it assumes hyper-threads): on a VM
  // whose logical CPUs are whole cores that uses half the machine. Default: every CPU this
  // process may run on, unless --threads or TVM_NUM_THREADS says otherwise.
  std::string threads = Get(args, "--threads", "");
  if (threads.empty() && getenv("TVM_NUM_THREADS") == nullptr) threads = std::to_string(UsableCpus());
  if (!threads.empty()) setenv("TVM_NUM_THREADS", threads.c_str(), 1);
  try {
    return std::string(argv[1]) == "run" ? CmdRun(args) : CmdRpc(args);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
