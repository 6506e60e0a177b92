#!/usr/bin/python3
"""A client in another language: Python stubs generated from proto/ stream from a real cohort-worker.

Run by ctest with Debian's python3 (python3-grpcio, python3-protobuf). It starts the worker itself,
generates the stubs with protoc and grpc_python_plugin into a temporary folder, streams a request,
checks the standard health and reflection services, and drains the worker with SIGTERM.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--proto-dir", required=True)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="cohort_py_")
    worker = None
    try:
        plugin = shutil.which("grpc_python_plugin")
        assert plugin, "grpc_python_plugin not found (Debian package protobuf-compiler-grpc)"
        subprocess.run(["protoc", f"--proto_path={args.proto_dir}", f"--python_out={tmp}", f"--grpc_out={tmp}",
                        f"--plugin=protoc-gen-grpc={plugin}", "cohort/v1/inference.proto",
                        "cohort/worker/v1/worker.proto"], check=True, cwd=args.proto_dir)
        sys.path.insert(0, tmp)
        import grpc
        from cohort.v1 import inference_pb2 as pb
        from cohort.worker.v1 import worker_pb2_grpc

        port_file = os.path.join(tmp, "ports.json")
        log = open(os.path.join(tmp, "worker.log"), "w")
        worker = subprocess.Popen([args.worker, "--model", args.model, "--host", "127.0.0.1", "--port", "0",
                                   "--metrics-port", "-1", "--port-file", port_file], stdout=log, stderr=log)
        deadline = time.time() + 30
        while not os.path.exists(port_file):
            assert worker.poll() is None, "worker exited: " + open(log.name).read()
            assert time.time() < deadline, "worker did not start"
            time.sleep(0.05)
        port = json.load(open(port_file))["grpc_port"]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)

        # Standard health service, called by its wire name: status SERVING is field 1 = 1.
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        assert check(b"", timeout=5) == b"\x08\x01", "health is not SERVING"
        # Server reflection lists the worker service (list_services is field 7).
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
        listing = b"".join(reflect(iter([b"\x3a\x00"]), timeout=5))
        assert b"cohort.worker.v1.Worker" in listing, listing

        stub = worker_pb2_grpc.WorkerStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                     sampling=pb.SamplingParams(temperature=0.0),
                                     stopping=pb.StoppingCriteria(max_tokens=6, ignore_eos=True))
        tokens, final = [], None
        for response in stub.Generate(request, timeout=30):
            if response.HasField("chunk"):
                tokens.extend(response.chunk.token_ids)
            else:
                final = response.final
        assert len(tokens) == 6, tokens
        assert final is not None and final.finish_reason == pb.FINISH_REASON_LENGTH, final
        assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 6, final.usage

        try:
            list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1]),
                                                  sampling=pb.SamplingParams(top_p=0.0)), timeout=10))
            raise AssertionError("top_p 0 was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in e.details(), (e.code(), e.details())

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0, "worker did not exit 0 after SIGTERM"
        worker = None
        print(f"python client: streamed {tokens}, health SERVING, reflection lists the service")
        print("1 passed, 0 failed")
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
