// The example programs' checking: named steps, checks that end the program with a message
// naming the step, and the one way a run reports its failure. Scaffolding of the examples (a
// service keeps jobsvc.js, not this).
"use strict";
const grpc = require("@grpc/grpc-js");
const { errorInfo } = require("./jobsvc");

class Failure extends Error {}

function check(condition, message) {
  if (!condition) throw new Failure(message);
}

let currentStep = "start";
function step(name) {
  currentStep = name;
  console.log(`==> ${name}`);
}

// Runs `main`; any failure ends the program with exit status 1 and a line naming the step.
function run(main) {
  main().catch((err) => {
    if (err instanceof Failure) {
      console.error(`FAILED at step '${currentStep}': ${err.message}`);
    } else if (typeof err.code === "number") {
      const info = errorInfo(err);
      const reason = info ? ` (reason ${info.reason})` : "";
      console.error(
        `FAILED at step '${currentStep}': ${grpc.status[err.code]}${reason}: ${err.details}`,
      );
    } else {
      console.error(`FAILED at step '${currentStep}':`, err);
    }
    process.exit(1);
  });
}

module.exports = { Failure, check, step, run };
