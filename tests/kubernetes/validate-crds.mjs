// Validates PodMonitor and PrometheusRule objects against the Prometheus
// operator's CRD schemas, as packaged by @kubernetes-models/prometheus-operator
// (npm; installed by `cargo xtask setup` into target/tools/node). Those
// validators check types, required fields and formats, not unknown fields.
//
//   node validate-crds.mjs FILE...   -> one line per object; exit 1 on any error
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { PodMonitor, PrometheusRule };
let failed = false;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const obj = doc.toJS();
    const model = obj && models[obj.kind];
    if (!model) continue;
    const name = `${obj.kind.toLowerCase()}/${obj.metadata?.name}`;
    try {
      new model(obj).validate();
      console.log(`ok ${file} ${name}`);
    } catch (err) {
      failed = true;
      console.log(`FAIL ${file} ${name}: ${err.message}`);
    }
  }
}
process.exit(failed ? 1 : 0);
