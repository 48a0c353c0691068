// A second toolchain's client: @grpc/grpc-js + @grpc/proto-loader, from the repository's .proto.
// usage: node generate.js PROTO_PATH TARGET TOKEN_IDS(comma) MAX_NEW_TOKENS
// prints one JSON line: {"token_ids": [...], "text": "...", "chunks": n, "finish_reason": "..."}
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [protoPath, target, ids, maxNew] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, { keepCase: true, enums: String, longs: Number, defaults: true });
const v1 = grpc.loadPackageDefinition(definition).expertmesh.v1;
const client = new v1.Generation(target, grpc.credentials.createInsecure());

const request = {
  token_ids: ids.split(",").map(Number),
  sampling: { temperature: 0, max_new_tokens: Number(maxNew), ignore_eos: true },
};
const result = { token_ids: [], text: "", chunks: 0, finish_reason: null };
const call = client.Generate(request, { deadline: Date.now() + 60000 });
call.on("data", (response) => {
  result.chunks += 1;
  result.token_ids.push(...response.token_ids);
  result.text += response.text;
  if (response.finish_reason !== "FINISH_REASON_UNSPECIFIED") result.finish_reason = response.finish_reason;
});
call.on("error", (err) => { console.error(err.message); process.exit(1); });
call.on("end", () => { console.log(JSON.stringify(result)); client.close(); });
