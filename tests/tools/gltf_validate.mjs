// Validate glTF/GLB files with the Khronos glTF-Validator (npm "gltf-validator").
// Usage: node tests/tools/gltf_validate.mjs FILE...
// Prints one JSON object per file, one per line: the validator's report (issues.numErrors,
// issues.numWarnings, issues.messages, info). When the validator refuses a file outright
// (for example it cannot tell glTF from GLB), the promise rejects; we still print a report
// with one error, code VALIDATOR_REJECTED, so callers see "invalid" rather than a crash.
import { readFile } from "node:fs/promises";
import path from "node:path";
import validator from "gltf-validator";

async function validateOne(file) {
  const bytes = new Uint8Array(await readFile(file));
  try {
    return await validator.validateBytes(bytes, {
      uri: path.basename(file),
      maxIssues: 200,
      // External resources are never fetched: our GLBs must be self-contained.
      externalResourceFunction: (uri) => Promise.reject(`external resource not allowed: ${uri}`),
    });
  } catch (error) {
    return {
      uri: path.basename(file),
      validatorVersion: validator.version(),
      issues: {
        numErrors: 1,
        numWarnings: 0,
        numInfos: 0,
        numHints: 0,
        messages: [{ code: "VALIDATOR_REJECTED", message: String(error), severity: 0 }],
        truncated: false,
      },
    };
  }
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node gltf_validate.mjs FILE...");
  process.exit(2);
}
for (const file of files) {
  process.stdout.write(JSON.stringify(await validateOne(file)) + "\n");
}
