// Checks the generated contracts with validators that are not pydantic:
//   node check.mjs DOCS_DIR SAMPLES_JSON
// 1. every docs/schemas/*.json compiles under Ajv2020 in strict mode (with ajv-formats);
// 2. each sample {schema, name, valid, payload} gets the expected verdict;
// 3. docs/asyncapi.json parses as AsyncAPI 3 without errors (@asyncapi/parser).
// Prints one line per problem and exits 1 when there is any.
import { readFileSync, readdirSync } from "node:fs";
import { join, resolve } from "node:path";

import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { Parser, fromFile } from "@asyncapi/parser";

const DIALECT = "https://json-schema.org/draft/2020-12/schema";
const [docsDir, samplesPath] = process.argv.slice(2).map((p) => resolve(p));
const problems = [];

// --- JSON Schemas -----------------------------------------------------------
const ajv = new Ajv2020({ strict: true, allErrors: true });
addFormats(ajv);
const schemaDir = join(docsDir, "schemas");
const files = readdirSync(schemaDir).filter((f) => f.endsWith(".json")).sort();
const ids = {};
for (const file of files) {
  const schema = JSON.parse(readFileSync(join(schemaDir, file), "utf8"));
  const name = file.replace(/\.json$/, "");
  if (schema.$schema !== DIALECT) problems.push(`${file}: $schema is ${schema.$schema}, want ${DIALECT}`);
  if (!schema.$id) problems.push(`${file}: no $id`);
  if (!(schema.required || []).includes("type")) problems.push(`${file}: type is not required`);
  try {
    ajv.addSchema(schema);
    ajv.getSchema(schema.$id); // compiles, throws in strict mode on anything ajv does not understand
    ids[name] = schema.$id;
  } catch (e) {
    problems.push(`${file}: does not compile: ${e.message}`);
  }
}
console.log(`compiled ${Object.keys(ids).length} of ${files.length} schemas (Ajv2020, strict)`);

// --- samples ----------------------------------------------------------------
const samples = JSON.parse(readFileSync(samplesPath, "utf8"));
for (const { schema, name, valid, payload } of samples) {
  const validate = ids[schema] && ajv.getSchema(ids[schema]);
  if (!validate) {
    problems.push(`${name}: no compiled schema ${schema}`);
    continue;
  }
  const ok = validate(payload);
  if (ok !== valid) {
    const why = ok ? "accepted" : ajv.errorsText(validate.errors);
    problems.push(`${name}: expected ${valid ? "valid" : "invalid"} against ${schema}, got: ${why}`);
  }
}
console.log(`checked ${samples.length} samples`);

// --- AsyncAPI ---------------------------------------------------------------
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, join(docsDir, "asyncapi.json")).parse();
for (const d of diagnostics) {
  const where = (d.path || []).join("/");
  const line = `asyncapi.json ${where}: ${d.message} (${d.code})`;
  if (d.severity === 0) problems.push(line);
  else console.log(`note: ${line}`);
}
if (document) console.log(`parsed AsyncAPI ${document.version()}: ${document.operations().length} operations`);
else problems.push("asyncapi.json: the AsyncAPI parser returned no document");

for (const p of problems) console.log(`PROBLEM ${p}`);
process.exit(problems.length ? 1 : 0);
