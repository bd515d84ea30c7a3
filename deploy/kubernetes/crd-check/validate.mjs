// Validates Prometheus operator objects against the CRD schemas that
// @kubernetes-models/prometheus-operator generates from the operator's Go API types.
// Reads a JSON array of objects on stdin; prints one line per object; exit 1 on any error
// or on a kind it has no schema for.
//
//   node validate.mjs < objects.json        (deploy/kubernetes/check.sh runs it)
import { readFileSync } from "node:fs";
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const o of objects) {
  const where = `${o.kind}/${o.metadata?.name}`;
  const Model = o.apiVersion === "monitoring.coreos.com/v1" ? v1[o.kind] : undefined;
  if (!Model) {
    console.log(`ERROR ${where}: no schema for ${o.apiVersion} ${o.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(o).validate();
    console.log(`ok ${where} (${o.apiVersion})`);
  } catch (e) {
    console.log(`ERROR ${where}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
