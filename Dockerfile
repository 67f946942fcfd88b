# syntax=docker/dockerfile:1
# One image for both parts: `webhook …` (Deployment) and `proxy …` (DaemonSet) are its arguments.
# Multi-stage: compile with the full toolchain, ship only production dependencies on distroless,
# as the non-root user 65532 (the chart also sets runAsNonRoot and a read-only root filesystem).
# Node.js: the active LTS line (26 since October 2026); package.json `engines` lists the supported
# lines, and the test suite also runs on the version scripts/lts-node.sh pins. All stages on Debian 13.
ARG NODE_MAJOR=26

FROM node:${NODE_MAJOR}-trixie-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npx tsc -p tsconfig.build.json

FROM node:${NODE_MAJOR}-trixie-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

FROM gcr.io/distroless/nodejs${NODE_MAJOR}-debian13:nonroot
WORKDIR /app
ENV NODE_ENV=production
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /src/dist/src ./dist/src
COPY package.json ./
USER 65532:65532
EXPOSE 8443 5000
ENTRYPOINT ["/nodejs/bin/node", "dist/src/cli.js"]
CMD ["--help"]
