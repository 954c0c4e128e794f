#!/usr/bin/env node
// Streams a completion from a loraplex engine. Loads the .proto files from the repository's protos/ folder
// at run time (no generated code), which is how any language's client can use the contract directly.
//
//   node generate.js --engine 127.0.0.1:50051 --adapter acme/support-bot@prod --max-new-tokens 32 "Hello"
//
// Prints one line per message: "adapter <name>@<version> <digest>", "delta <json text>", "finish <reason>".
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function parseArgs(argv) {
  const opts = { engine: "127.0.0.1:50051", adapter: "", maxNewTokens: 32, token: process.env.LORAPLEX_TOKEN || "", prompt: "" };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--engine") opts.engine = argv[++i];
    else if (arg === "--adapter") opts.adapter = argv[++i];
    else if (arg === "--max-new-tokens") opts.maxNewTokens = Number(argv[++i]);
    else if (arg === "--token") opts.token = argv[++i];
    else opts.prompt = arg;
  }
  return opts;
}

function loadEngineService() {
  const protoRoot = path.resolve(__dirname, "..", "..", "protos");
  const definition = protoLoader.loadSync("loraplex/engine/v1/engine_service.proto", {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).loraplex.engine.v1.EngineService;
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const EngineService = loadEngineService();
  const client = new EngineService(opts.engine, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (opts.token) metadata.set("authorization", `Bearer ${opts.token}`);
  // Routing: a proxy in front of several engines (deploy/haproxy) keeps each adapter on one engine by this
  // header, since it cannot read the adapter out of the protobuf body. Harmless when calling an engine directly.
  if (opts.adapter) metadata.set("x-loraplex-adapter", opts.adapter);
  const request = {
    adapter: opts.adapter,
    text: opts.prompt || "Hello",
    stopping: { max_new_tokens: opts.maxNewTokens },
    response: { token_ids: true },
  };
  const call = client.GenerateStream(request, metadata, { deadline: Date.now() + 60000 });
  call.on("data", (message) => {
    if (message.adapter) {
      const a = message.adapter;
      console.log(`adapter ${a.adapter}@${a.version} ${a.digest}`);
    }
    if (message.tokens && message.tokens.length > 0) console.log(`delta ${JSON.stringify(message.text || "")}`);
    if (message.finish_reason && message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      console.log(`finish ${message.finish_reason}`);
    }
  });
  call.on("error", (err) => {
    console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
