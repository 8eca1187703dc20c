// Print the Khronos glTF validator's JSON report for one .glb / .gltf file.
//
// Usage: node tests/tools/validate_gltf.mjs PATH [--max-issues N]
// Install once: npm install --prefix tests/tools
// Exit status: 0 when the report was printed (whatever it says), 2 on bad
// usage or an unreadable file, 3 when the validator refused the input.
import fs from "node:fs";
import path from "node:path";
import * as validator from "gltf-validator";

const args = process.argv.slice(2);
if (args.length < 1 || args[0].startsWith("-")) {
  console.error("usage: node validate_gltf.mjs PATH [--max-issues N]");
  process.exit(2);
}
const file = path.resolve(args[0]);
let maxIssues = 0; // 0: unlimited
const i = args.indexOf("--max-issues");
if (i >= 0) maxIssues = Number.parseInt(args[i + 1], 10);

let bytes;
try {
  bytes = new Uint8Array(fs.readFileSync(file));
} catch (err) {
  console.error(`cannot read ${file}: ${err.message}`);
  process.exit(2);
}

const externalResourceFunction = (uri) =>
  new Promise((resolve, reject) => {
    const p = path.resolve(path.dirname(file), decodeURIComponent(uri));
    fs.readFile(p, (err, data) => (err ? reject(err.toString()) : resolve(new Uint8Array(data))));
  });

try {
  const report = await validator.validateBytes(bytes, {
    uri: path.basename(file),
    maxIssues,
    writeTimestamp: false,
    externalResourceFunction,
  });
  process.stdout.write(JSON.stringify(report, null, 2) + "\n");
} catch (err) {
  console.error(`validator refused ${file}: ${err}`);
  process.exit(3);
}
