// The plumbing a browser app keeps to call jobsvc over gRPC-Web: a JobService client that sends
// the bearer token on every call, and the google.rpc.ErrorInfo of a failed call.
//
//   import { jobsvcClient, errorInfo } from "./jobsvc.js";
//   const jobs = jobsvcClient("https://jobs.example.com", () => session.access_token);
//   const job = await jobs.getJob({ id }, { timeoutMs: 5000 });
//
// The stubs (messages and the JobService descriptor) are generated into gen/ from proto/ by
// `npm run generate`; google.protobuf types come from @bufbuild/protobuf/wkt.
import { type Client, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type ErrorInfo, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import { JobService } from "./gen/jobs/v1/jobs_pb.js";

/** A bearer token, or a function giving the current one (a Supabase session's access_token). */
export type Token = string | (() => string | Promise<string>);

/**
 * A JobService client over gRPC-Web (binary, through fetch) at `baseUrl`, the server's gRPC
 * address as a URL ("https://jobs.example.com", or "/" behind the page's own origin). With a
 * token, every call sends `authorization: Bearer <token>`; without one, calls are
 * UNAUTHENTICATED (reason TOKEN_MISSING). A page on another origin than the server needs the
 * server started with `--cors-allow-origin <the page's origin>`.
 */
export function jobsvcClient(baseUrl: string, token?: Token): Client<typeof JobService> {
  const interceptors: Interceptor[] = [];
  if (token !== undefined) {
    interceptors.push((next) => async (req) => {
      const value = typeof token === "function" ? await token() : token;
      req.header.set("authorization", `Bearer ${value}`);
      return next(req);
    });
  }
  return createClient(JobService, createGrpcWebTransport({ baseUrl, interceptors }));
}

/**
 * The google.rpc.ErrorInfo of a failed call (jobsvc sends one with every error: domain
 * "jobsvc", a stable UPPER_SNAKE `reason` to branch on), or undefined when `err` is not a
 * ConnectError or carries none.
 */
export function errorInfo(err: unknown): ErrorInfo | undefined {
  return err instanceof ConnectError ? err.findDetails(ErrorInfoSchema)[0] : undefined;
}
